"""A finished student as an ONNX file, checked against PyTorch with ONNX Runtime before it is written.

The graph is the student's ``forward`` in eval mode (batch norm uses its running statistics; the
exporters fold it into the convolutions and the FC): input ``images``, ImageNet-normalised float32
N x 3 x H x W at the run's image size, output ``embedding``, N x 2048 (the retrieval feature, before any
L2 normalisation); the batch axis is dynamic. torch's ``dynamo`` exporter is tried first, the
TorchScript one (``dynamic_axes``) when it fails or cannot write the opset asked for (torch 2.14's
dynamo exporter starts at opset 18, hence the default). The file's ``metadata_props`` record the
architecture, image size, normalisation, featcache version and the input convention.

Check (``check=True``): ONNX Runtime (CPUExecutionProvider) and PyTorch (CPU, float32) embed the same
seeded random images, batches of 1 and 3 (3 also proves the dynamic axis). Both must hold per batch:

* ``max |onnx - torch| <= atol * max |torch|`` with ``atol = 1e-3``: the difference in units of the
  embedding's own scale (embeddings range from 1e-9 to 1e3 with the weights). It is float32 rounding:
  measured against the same model in float64, PyTorch's float32 output itself is off by up to 1.1e-4
  of the scale (resnet50 at 256x128; 1e-5 for the four students at 64x32) and ORT's by as much, and the
  two differ by up to 1.4e-4, so 1e-3 leaves a sevenfold margin (``atol`` loosens it if a model needs);
  the faults the tests plant (batch norm in training mode, a shifted BN bias, a 1 % error in the
  output) move embeddings by 7e-3 of their scale or more;
* the least per-image cosine similarity ``>= 0.99999`` (float32 rounding gives 1 - 1e-8 or closer): a
  fault spread thinly over all 2048 dimensions, under the max-difference bound, still shows here.

A failed check raises ``RunError`` naming the batch size and the differences, and nothing is written:
the file is renamed into place only after the check has passed, so an existing file is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from featcache.distill.config import ATOL  # max |onnx - torch| / max |torch|
from featcache.errors import ConfigError, InputError, RunError

logger = logging.getLogger(__name__)

MIN_COSINE = 0.99999  # least per-image cosine similarity
CHECK_BATCHES = (1, 3)
EXAMPLE_BATCH = 2     # the traced batch: neither of the checked ones, so a batch size baked in would show
INPUT, OUTPUT = "images", "embedding"


def export_onnx(run: Path, out: Path, opset: int = 18, check: bool = True, atol: float = ATOL) -> dict:
    """Export the student of ``run`` to ``out``; with ``check``, refuse (``RunError``) an export ORT disagrees with."""
    import onnx

    from featcache.distill.load import load_student

    if not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"--opset {opset}: expected 7 to {onnx.defs.onnx_opset_version()} (this onnx's newest)")
    if not atol > 0:
        raise ConfigError(f"--atol {atol}: expected a positive tolerance (a share of the embedding's largest value)")
    from featcache.fileio import check_output

    check_output(out, "--onnx")  # before the export's tracing and checks, which take seconds to minutes
    t0 = time.perf_counter()
    model, _, meta = load_student(Path(run), "cpu")
    model.eval()
    size = tuple(int(v) for v in meta["image_size"])
    proto, exporter, failed = _export(model, size, opset)
    _set_metadata(proto, model.arch, size)
    data = proto.SerializeToString()
    checks: list[dict] = []
    if check:
        try:
            checks = check_onnx(model, data, size, CHECK_BATCHES, atol)
        except RunError as exc:
            raise RunError(f"{out}: not written: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from featcache.fileio import atomic_write

    atomic_write(out, lambda p: p.write_bytes(data))
    seconds = time.perf_counter() - t0
    logger.info("exported %s (%s, opset %d, %s exporter) to %s in %.1f s%s", run, model.arch, opset, exporter, out, seconds,
                "; ORT check passed at batch " + ", ".join(str(c["batch"]) for c in checks) if checks else "; not checked")
    return {"path": str(out), "arch": model.arch, "image_size": list(size), "opset": opset, "exporter": exporter,
            "exporters_failed": failed, "checked": bool(checks), "batch_sizes": [c["batch"] for c in checks],
            "max_abs_diff": {c["batch"]: c["max_abs_diff"] for c in checks},
            "max_abs_diff_scaled": {c["batch"]: c["max_abs_diff_scaled"] for c in checks},
            "min_cosine": {c["batch"]: c["min_cosine"] for c in checks},
            "tolerance": {"max_abs_diff_scaled": atol, "min_cosine": MIN_COSINE,
                          "scale": "max |embedding| of the PyTorch output of the same batch"},
            "bytes": len(data), "seconds": seconds}


def check_onnx(model: torch.nn.Module, onnx_model: bytes | Path, image_size: tuple[int, int],
               batch_sizes: tuple[int, ...] = CHECK_BATCHES, atol: float = ATOL) -> list[dict]:
    """Compare ONNX Runtime with ``model`` on seeded random images; ``RunError`` at the first batch out of tolerance."""
    import onnxruntime as ort

    from featcache.distill.students import normalize

    if not isinstance(onnx_model, bytes) and not Path(onnx_model).is_file():
        raise InputError(f"{onnx_model}: no such ONNX file")
    src = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    results = []
    for n in batch_sizes:
        g = torch.Generator().manual_seed(1000 + n)
        x = normalize(torch.randint(0, 256, (n, 3, *image_size), generator=g, dtype=torch.uint8))
        with torch.inference_mode():
            ref = model(x.to(device)).float().cpu().numpy().astype(np.float64)
        got = np.asarray(_run_onnx(session, x.numpy()), dtype=np.float64)
        if got.shape != ref.shape:
            raise RunError(f"ONNX Runtime gives shape {got.shape} at batch {n}, PyTorch {ref.shape}")
        diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
        scaled = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        cos = _min_cosine(got, ref)
        row = {"batch": n, "max_abs_diff": diff, "scale": scale, "max_abs_diff_scaled": scaled, "min_cosine": cos}
        if not (np.isfinite(got).all() and scaled <= atol and cos >= MIN_COSINE):
            raise RunError(f"ONNX Runtime and PyTorch disagree at batch {n}: max |difference| {diff:.3g} = {scaled:.3g} of the "
                           f"largest |embedding| {scale:.3g} (allowed {atol:g}), least cosine {cos:.7f} (allowed >= {MIN_COSINE})")
        results.append(row)
    return results


def _run_onnx(session, x: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT], {INPUT: x})[0]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Least per-row cosine; two zero rows agree (1), one zero row does not (0)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both = (na > 0) & (nb > 0)
    cos = np.where(both, (a * b).sum(1) / np.where(both, na * nb, 1.0), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return float(cos.min())


# ---------------------------------------------------------------------- exporting
def _export(model: torch.nn.Module, size: tuple[int, int], opset: int):
    """(ModelProto, exporter name, why earlier exporters were passed over)."""
    x = torch.randn(EXAMPLE_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    failed: list[str] = []
    for name, fn in (("dynamo", _dynamo), ("torchscript", _torchscript)):
        try:
            proto = fn(model, x, opset)
            problem = _interface_problem(proto, opset)
        except Exception as exc:  # an exporter's own failure: try the next one, report every reason if none works
            problem = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if problem is None:
            return proto, name, failed
        logger.warning("the %s ONNX exporter did not work (%s)%s", name, problem, "; trying the next" if name == "dynamo" else "")
        failed.append(f"{name}: {problem}")
    raise RunError(f"cannot export {model.arch} to ONNX opset {opset}: " + "; ".join(failed))


@contextlib.contextmanager
def _quiet(*names: str):
    """The exporter's helpers log every optimisation pass at INFO: keep them to warnings while exporting."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamo(model: torch.nn.Module, x: torch.Tensor, opset: int):
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), None, dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, report=False)
    return program.model_proto


def _torchscript(model: torch.nn.Module, x: torch.Tensor, opset: int):
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset,
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _interface_problem(proto, opset: int) -> str | None:
    """What is wrong with an exported graph's interface (names, dynamic batch, opset, batch norm mode), or None."""
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        return f"wrote opset {got}, not {opset}"
    ins, outs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if ins != [INPUT] or outs != [OUTPUT]:
        return f"inputs {ins} and outputs {outs}, expected [{INPUT!r}] and [{OUTPUT!r}]"
    for v in (proto.graph.input[0], proto.graph.output[0]):
        if v.type.tensor_type.shape.dim[0].HasField("dim_value"):
            return f"{v.name} has a fixed batch size {v.type.tensor_type.shape.dim[0].dim_value}"
    for node in proto.graph.node:
        if node.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in node.attribute):
            return f"batch norm {node.name} exported in training mode"
    return None


def _set_metadata(proto, arch: str, size: tuple[int, int]) -> None:
    from featcache import __version__
    from featcache.distill.students import EMBED_DIM, IMAGENET_MEAN, IMAGENET_STD

    props = {"arch": arch, "image_size": json.dumps(list(size)),
             "mean": json.dumps(list(IMAGENET_MEAN)), "std": json.dumps(list(IMAGENET_STD)),
             "featcache_version": __version__,
             "input": f"{INPUT}: ImageNet-normalised float32 NCHW, N x 3 x {size[0]} x {size[1]} (RGB / 255, minus mean, over std)",
             "output": f"{OUTPUT}: N x {EMBED_DIM} float32 retrieval embedding (BN output, not L2-normalised)"}
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
