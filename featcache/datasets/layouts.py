"""Readers for the official folder layouts of Market-1501, DukeMTMC-reID, VeRi-776 and MSMT17.

Each reader parses identities and cameras from the official file names and
rejects (never guesses) names that break the rule.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from featcache.registry import Registry

from featcache.datasets.base import (
    DatasetLayoutError,
    Item,
    Listing,
    Rejected,
    image_files,
    require_dir,
)

logger = logging.getLogger(__name__)

Reader = Callable[[Path], Listing]
READERS: Registry[Reader] = Registry("dataset layout")
#: The naming rule of each layout, shown in error messages.
PATTERNS: dict[str, str] = {}


def register(name: str, pattern: str) -> Callable[[Reader], Reader]:
    """Register a layout reader under ``name`` with the naming rule its errors quote."""
    PATTERNS[name] = pattern
    return READERS.register(name)


def available() -> list[str]:
    return sorted(READERS.names())


def get_reader(name: str) -> Reader:
    return READERS.get(name)


# --------------------------------------------------------------------------- Market / Duke
MARKET_RE = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
DUKE_RE = re.compile(r"^(\d{4})_c(\d)_f(\d{7})\.jpg$")
_BBOX_HINT = "bounding_box_train/, bounding_box_test/, query/"


def _read_bbox_layout(
    root: Path, name: str, regex: re.Pattern[str], cams: range, pattern: str
) -> Listing:
    """The Market-1501 family: three folders, identity and camera in each file name."""
    listing = Listing(name=name, root=root)
    for sub, split in (("bounding_box_train", "train"), ("query", "query"), ("bounding_box_test", "gallery")):
        folder = require_dir(root, sub, name, _BBOX_HINT)
        for f in image_files(folder):
            rel = f"{sub}/{f.name}"
            m = regex.match(f.name)
            if m is None:
                listing.rejected.append(Rejected(rel, f"name does not match {pattern}", split))
                continue
            pid, cam = int(m.group(1)), int(m.group(2))
            if pid == -1:  # junk boxes of the official test set: not part of the protocol
                listing.junk += 1
                continue
            if cam not in cams:
                listing.rejected.append(Rejected(rel, f"camera c{cam} outside c{cams.start}-c{cams.stop - 1}", split))
                continue
            if split == "train" and pid == 0:
                listing.rejected.append(Rejected(rel, "distractor id 0000 in the training split", split))
                continue
            listing.items.append(Item(rel, pid, cam, split))
    return listing


@register("market1501", "PPPP_cCsS_FFFFFF_BB.jpg (e.g. 0002_c1s1_000451_03.jpg)")
def read_market1501(root: Path) -> Listing:
    return _read_bbox_layout(root, "market1501", MARKET_RE, range(1, 7), PATTERNS["market1501"])


@register("dukemtmc", "PPPP_cC_fFFFFFFF.jpg (e.g. 0001_c2_f0046182.jpg)")
def read_dukemtmc(root: Path) -> Listing:
    return _read_bbox_layout(root, "dukemtmc", DUKE_RE, range(1, 9), PATTERNS["dukemtmc"])


# --------------------------------------------------------------------------- VeRi-776
VERI_RE = re.compile(r"^(\d{4})_c(\d{3})_(\d{8})_(\d+)\.jpg$")


@register("veri776", "PPPP_cCCC_FFFFFFFF_V.jpg (e.g. 0002_c002_00030600_0.jpg)")
def read_veri776(root: Path) -> Listing:
    """VeRi-776: ``image_train``, ``image_query``, ``image_test``; the order of ``name_*.txt`` when present.

    The official protocol indexes the gallery by line of ``name_test.txt``, so
    that order is kept; listed files that are absent stay in the listing and
    are reported as failed at extraction.
    """
    listing = Listing(name="veri776", root=root)
    hint = "image_train/, image_query/, image_test/ and optionally name_train.txt, name_query.txt, name_test.txt"
    for sub, lst, split in (
        ("image_train", "name_train.txt", "train"),
        ("image_query", "name_query.txt", "query"),
        ("image_test", "name_test.txt", "gallery"),
    ):
        folder = require_dir(root, sub, "veri776", hint)
        list_file = root / lst
        if list_file.is_file():
            names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
            on_disk = {f.name for f in image_files(folder)}
            unlisted = on_disk.difference(names)
            if unlisted:
                logger.warning("veri776: %d file(s) in %s are not in %s and are ignored", len(unlisted), folder, list_file)
        else:
            names = [f.name for f in image_files(folder)]
        for fname in names:
            rel = f"{sub}/{fname}"
            m = VERI_RE.match(fname)
            if m is None:
                listing.rejected.append(Rejected(rel, f"name does not match {PATTERNS['veri776']}", split))
                continue
            cam = int(m.group(2))
            if not 1 <= cam <= 20:
                listing.rejected.append(Rejected(rel, f"camera c{cam:03d} outside c001-c020", split))
                continue
            listing.items.append(Item(rel, int(m.group(1)), cam, split))
    return listing


# --------------------------------------------------------------------------- MSMT17
MSMT_RE = re.compile(r"^(\d{4})_(\d{3})_(\d{2})_(\d{4})(morning|noon|afternoon)_(\d{4})_(\d+)(_ex)?\.jpg$")
_MSMT_LISTS = (("list_train.txt", "train"), ("list_val.txt", "train"), ("list_query.txt", "query"), ("list_gallery.txt", "gallery"))


def _msmt_dirs(root: Path) -> tuple[str, str]:
    for train, test in (("train", "test"), ("mask_train_v2", "mask_test_v2")):
        if (root / train).is_dir() and (root / test).is_dir():
            return train, test
    raise DatasetLayoutError(
        f"msmt17: no image folders under {root}: expected train/ and test/ (MSMT17_V1) "
        "or mask_train_v2/ and mask_test_v2/ (MSMT17_V2), beside list_train.txt, list_val.txt, "
        "list_query.txt and list_gallery.txt"
    )


@register("msmt17", "list lines 'PPPP/PPPP_SSS_CC_DATEtime_FFFF_V.jpg LABEL' (e.g. 0000/0000_000_01_0303morning_0015_0.jpg 0)")
def read_msmt17(root: Path) -> Listing:
    """MSMT17: the official list files give the split and the label; the camera is the third name field.

    ``list_val.txt`` joins the training split, as in torchreid and fast-reid.
    """
    listing = Listing(name="msmt17", root=root)
    train_dir, test_dir = _msmt_dirs(root)
    for lst, split in _MSMT_LISTS:
        list_file = root / lst
        if not list_file.is_file():
            if lst == "list_val.txt":
                continue
            raise DatasetLayoutError(f"msmt17: list file {list_file} not found (expected {', '.join(n for n, _ in _MSMT_LISTS)})")
        base = train_dir if split == "train" else test_dir
        for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise DatasetLayoutError(f"msmt17: {list_file}:{lineno}: expected 'RELPATH LABEL', got {line!r}")
            rel = f"{base}/{fields[0]}"
            m = MSMT_RE.match(Path(fields[0]).name)
            if m is None:
                listing.rejected.append(Rejected(rel, f"name does not match {PATTERNS['msmt17']}", split))
                continue
            cam = int(m.group(3))
            if not 1 <= cam <= 15:
                listing.rejected.append(Rejected(rel, f"camera {cam:02d} outside 01-15", split))
                continue
            listing.items.append(Item(rel, int(fields[1]), cam, split))
    return listing


# --------------------------------------------------------------------------- CSV manifest
#: what the folder layout counts as an image
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@register("folder", "any folder of images (searched recursively, sorted by path; no labels: identity 0, camera 0, "
                    "the gallery split)")
def read_folder(root: Path) -> Listing:
    listing = Listing("folder", root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    listing.items = [Item(rel, 0, 0, "gallery") for rel in files]
    return listing


@register("csv", "a CSV with header path,pid,camid,split (split: train, query or gallery)")
def read_csv(root: Path) -> Listing:
    """Any other data: ``ROOT/manifest.csv`` (or ROOT given as the CSV itself), paths relative to its folder."""
    import csv

    manifest = root if root.is_file() else root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetLayoutError(f"csv: manifest {manifest} not found (give --root a CSV file or a folder holding manifest.csv)")
    listing = Listing(name="csv", root=manifest.parent)
    root = manifest.parent.resolve()
    seen: dict[tuple[str, str], int] = {}
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"path", "pid", "camid", "split"}
        if reader.fieldnames is None or not need.issubset(reader.fieldnames):
            raise DatasetLayoutError(f"csv: {manifest} must have the header path,pid,camid,split; found {reader.fieldnames}")
        for lineno, row in enumerate(reader, 2):
            try:
                item = Item(row["path"].strip(), int(row["pid"]), int(row["camid"]), row["split"].strip())
            except (ValueError, DatasetLayoutError) as exc:
                raise DatasetLayoutError(f"csv: {manifest}:{lineno}: {exc} (row {row})") from None
            _confined(root, item.path, f"{manifest}:{lineno}")
            key = (item.path, item.split)
            if key in seen:
                raise DatasetLayoutError(f"csv: {manifest}:{lineno}: {item.path} is listed in split {item.split} again "
                                         f"(first on line {seen[key]}); a duplicate row would count twice in the metrics")
            seen[key] = lineno
            listing.items.append(item)
    if not listing.items:
        raise DatasetLayoutError(f"csv: manifest {manifest} lists no images (a header and no rows)")
    return listing


def _confined(root: Path, rel: str, where: str) -> None:
    """A manifest path must be relative and stay inside the manifest's folder, symbolic links resolved."""
    if Path(rel).is_absolute():
        raise DatasetLayoutError(f"csv: {where}: {rel!r} is absolute; paths are relative to the manifest's folder {root}")
    try:
        (root / rel).resolve().relative_to(root)
    except ValueError:
        raise DatasetLayoutError(f"csv: {where}: {rel!r} leads outside the manifest's folder {root} "
                                 "(after resolving '..' and symbolic links); copy or move the image inside it") from None
