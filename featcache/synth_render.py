"""Procedural renderers for synthetic persons and vehicles.

An identity is a set of appearance attributes (clothing colours and patterns,
bags, build; or vehicle body colour, type, roof and stripes). A camera is a
scene (background, illumination, colour cast, blur). Each image draws a
viewpoint, scale, offset and optional occlusion, so the same identity looks
different across cameras while staying recognisable.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

VIEWS = ("front", "back", "left", "right")
CONDITIONS = ("day", "night", "blur")


def _color(rng: np.random.Generator, sat: tuple[float, float] = (0.3, 1.0), val: tuple[float, float] = (0.2, 0.95)) -> tuple[int, int, int]:
    h = rng.random()
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass(frozen=True)
class Scene:
    """A camera: background layout, lighting and optics."""

    wall: tuple[int, int, int]
    floor: tuple[int, int, int]
    horizon: float
    props: tuple[tuple[float, float, float, float, tuple[int, int, int]], ...]
    gain: float
    cast: tuple[float, float, float]
    blur: float
    view_bias: int
    condition: str = "day"  # day; night (an infrared-like monochrome camera); blur (a far, out-of-focus camera)

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Scene":
        props = tuple(
            (rng.uniform(0, 1), rng.uniform(0, 0.8), rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.5), _color(rng, (0, 0.6)))
            for _ in range(int(rng.integers(2, 6)))
        )
        return cls(
            wall=_color(rng, (0, 0.5)), floor=_color(rng, (0, 0.3), (0.2, 0.7)), horizon=rng.uniform(0.45, 0.8),
            props=props, gain=rng.uniform(0.6, 1.3), cast=tuple(rng.uniform(0.85, 1.15, 3)),  # type: ignore[arg-type]
            blur=rng.uniform(0, 1.2), view_bias=int(rng.integers(0, 4)),
        )

    def background(self, w: int, h: int, rng: np.random.Generator) -> Image.Image:
        img = Image.new("RGB", (w, h), self.wall)
        d = ImageDraw.Draw(img)
        d.rectangle([0, int(self.horizon * h), w, h], fill=self.floor)
        dx = rng.uniform(-0.1, 0.1)
        for x, y, pw, ph, c in self.props:
            x0, y0 = (x + dx) * w, y * h
            d.rectangle([x0, y0, x0 + pw * w, y0 + ph * h], fill=c)
        return img

    def finish(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Lighting (camera gain and colour cast with per-image jitter), blur and sensor noise."""
        if self.blur > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(self.blur * rng.uniform(0.5, 1.5)))
        if self.condition == "blur":  # patterns and edges are gone, colours and layout remain
            img = img.filter(ImageFilter.GaussianBlur(2.5 * img.width / 64))

        a = np.asarray(img, dtype=np.float32)
        gain = self.gain * rng.uniform(0.85, 1.15)
        a = a * gain * np.asarray(self.cast, dtype=np.float32) + rng.normal(0, 4, a.shape)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if self.condition == "night":  # a monochrome sensor: colour is gone; luminance, patterns and shape remain
            img = img.convert("L").convert("RGB")
        return img


@dataclass(frozen=True)
class Person:
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    upper: tuple[int, int, int]
    lower: tuple[int, int, int]
    shoes: tuple[int, int, int]
    pattern: str
    accent: tuple[int, int, int]
    bag: str
    bag_color: tuple[int, int, int]
    width: float
    lower_kind: str

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Person":
        skin_v = rng.uniform(0.35, 0.95)
        return cls(
            skin=tuple(int(c * 255) for c in colorsys.hsv_to_rgb(0.07, rng.uniform(0.3, 0.6), skin_v)),  # type: ignore[arg-type]
            hair=_color(rng, (0, 0.6), (0.05, 0.5)), upper=_color(rng), lower=_color(rng, (0, 0.8)),
            shoes=_color(rng, (0, 0.5), (0.05, 0.9)), pattern=str(rng.choice(["plain", "stripes", "two-tone", "logo"])),
            accent=_color(rng), bag=str(rng.choice(["none", "none", "backpack", "handbag"])), bag_color=_color(rng, (0, 0.8)),
            width=rng.uniform(0.8, 1.2), lower_kind=str(rng.choice(["pants", "pants", "shorts", "skirt"])),
        )

    def draw(self, d: ImageDraw.ImageDraw, cx: float, foot: float, height: float, view: str, stride: float) -> None:
        side = view in ("left", "right")
        hw = height * 0.13 * self.width * (0.65 if side else 1.0)
        head_r = height * 0.07
        top = foot - height
        neck, waist, knee = top + height * 0.15, top + height * 0.52, top + height * 0.75
        # legs and shoes
        for sgn in (-1, 1):
            lx = cx + sgn * hw * 0.45 + (sgn * stride * height * 0.05 if side else 0)
            leg_color = self.lower if self.lower_kind == "pants" else self.skin
            d.rectangle([lx - hw * 0.35, waist, lx + hw * 0.35, foot - height * 0.04], fill=leg_color)
            if self.lower_kind != "pants":
                d.rectangle([lx - hw * 0.38, waist, lx + hw * 0.38, knee if self.lower_kind == "shorts" else knee + height * 0.05], fill=self.lower)
            d.rectangle([lx - hw * 0.4, foot - height * 0.045, lx + hw * 0.45, foot], fill=self.shoes)
        if self.lower_kind == "skirt":
            d.polygon([(cx - hw, waist), (cx + hw, waist), (cx + hw * 1.3, knee), (cx - hw * 1.3, knee)], fill=self.lower)
        # backpack seen from behind or the side is drawn under the arms
        if self.bag == "backpack" and view != "front":
            off = {"back": 0.0, "left": hw * 0.9, "right": -hw * 0.9}[view]
            d.rectangle([cx + off - hw * 0.8, neck + height * 0.04, cx + off + hw * 0.8, waist - height * 0.04], fill=self.bag_color)
        # torso and pattern
        d.rectangle([cx - hw, neck, cx + hw, waist], fill=self.upper)
        if self.pattern == "stripes":
            for k in range(4):
                y = neck + (waist - neck) * (k + 0.5) / 4.5
                d.rectangle([cx - hw, y, cx + hw, y + height * 0.025], fill=self.accent)
        elif self.pattern == "two-tone":
            d.rectangle([cx - hw, (neck + waist) / 2, cx + hw, waist], fill=self.accent)
        elif self.pattern == "logo" and view == "front":
            d.ellipse([cx - hw * 0.4, neck + height * 0.08, cx + hw * 0.4, neck + height * 0.16], fill=self.accent)
        if self.bag == "backpack" and view == "front":
            for sgn in (-1, 1):
                d.rectangle([cx + sgn * hw * 0.6 - 2, neck, cx + sgn * hw * 0.6 + 2, waist - height * 0.1], fill=self.bag_color)
        # arms
        for sgn in (-1, 1):
            ax = cx + sgn * (hw + height * 0.03) if not side else cx + sgn * stride * height * 0.04
            d.rectangle([ax - height * 0.03, neck + height * 0.01, ax + height * 0.03, waist + height * 0.02], fill=self.upper)
            d.ellipse([ax - height * 0.03, waist, ax + height * 0.03, waist + height * 0.06], fill=self.skin)
        if self.bag == "handbag":
            bx = cx + (hw + height * 0.06) * (1 if view in ("front", "left") else -1)
            d.rectangle([bx - height * 0.05, waist - height * 0.02, bx + height * 0.05, waist + height * 0.1], fill=self.bag_color)
        # head
        d.ellipse([cx - head_r, top, cx + head_r, top + 2 * head_r], fill=self.skin if view != "back" else self.hair)
        d.chord([cx - head_r, top, cx + head_r, top + 2 * head_r], 180, 360, fill=self.hair)


def render_person(person: Person, scene: Scene, rng: np.random.Generator, size: tuple[int, int] = (64, 128)) -> Image.Image:
    """A pedestrian crop (Market-1501 size 64x128), drawn at twice the size and reduced."""
    w, h = size[0] * 2, size[1] * 2
    img = scene.background(w, h, rng)
    d = ImageDraw.Draw(img)
    view = VIEWS[(scene.view_bias + int(rng.integers(0, 3))) % 4]
    scale = rng.uniform(0.75, 0.98)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    foot = h * rng.uniform(0.93, 1.0)
    person.draw(d, cx, foot, h * scale, view, stride=rng.uniform(-1, 1))
    _occlude(d, w, h, rng)
    img = img.resize(size, Image.BILINEAR)
    return scene.finish(img, rng)


def _occlude(d: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator, p: float = 0.3) -> None:
    """Partial occlusion: a pole, a passer-by's body or an object at the bottom."""
    if rng.random() >= p:
        return
    kind = rng.integers(0, 3)
    c = _color(rng, (0, 0.7))
    if kind == 0:
        x = rng.uniform(0.1, 0.8) * w
        d.rectangle([x, 0, x + rng.uniform(0.08, 0.18) * w, h], fill=c)
    elif kind == 1:
        left = rng.random() < 0.5
        x0 = 0 if left else w * rng.uniform(0.65, 0.8)
        d.rectangle([x0, h * rng.uniform(0.1, 0.3), x0 + w * rng.uniform(0.2, 0.35), h], fill=c)
    else:
        d.rectangle([0, h * rng.uniform(0.7, 0.85), w, h], fill=c)


@dataclass(frozen=True)
class Vehicle:
    body: tuple[int, int, int]
    roof: tuple[int, int, int]
    kind: str
    stripe: bool
    stripe_color: tuple[int, int, int]
    window: tuple[int, int, int]
    rack: bool

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Vehicle":
        body = _color(rng, (0, 1), (0.15, 0.95))
        return cls(
            body=body, roof=body if rng.random() < 0.6 else _color(rng), kind=str(rng.choice(["sedan", "suv", "truck", "van"])),
            stripe=bool(rng.random() < 0.35), stripe_color=_color(rng), window=_color(rng, (0, 0.3), (0.05, 0.4)),
            rack=bool(rng.random() < 0.25),
        )

    def draw(self, d: ImageDraw.ImageDraw, w: int, h: int, view: str) -> None:
        side = view in ("left", "right")
        aspect = {"sedan": 0.45, "suv": 0.6, "truck": 0.7, "van": 0.75}[self.kind]
        bw = w * (0.9 if side else 0.6)
        bh = bw * aspect * (0.55 if side else 1.0)
        x0, y1 = (w - bw) / 2, h * 0.88
        y0 = y1 - bh
        cab = bh * 0.45
        d.rectangle([x0, y0 + cab, x0 + bw, y1 - bh * 0.1], fill=self.body)
        inset = bw * (0.2 if side else 0.12)
        d.polygon([(x0 + inset, y0), (x0 + bw - inset, y0), (x0 + bw, y0 + cab), (x0, y0 + cab)], fill=self.roof)
        if self.kind == "truck" and side:
            d.rectangle([x0 + bw * 0.4, y0 - bh * 0.2, x0 + bw, y0 + cab], fill=self.roof)
        d.polygon([(x0 + inset * 1.3, y0 + cab * 0.2), (x0 + bw - inset * 1.3, y0 + cab * 0.2), (x0 + bw - inset * 0.5, y0 + cab * 0.9), (x0 + inset * 0.5, y0 + cab * 0.9)], fill=self.window)
        if self.stripe:
            d.rectangle([x0, y0 + cab + bh * 0.2, x0 + bw, y0 + cab + bh * 0.28], fill=self.stripe_color)
        if self.rack:
            d.rectangle([x0 + inset, y0 - bh * 0.06, x0 + bw - inset, y0], fill=(40, 40, 40))
        if side:
            for fx in (0.2, 0.8):
                cx = x0 + bw * fx
                d.ellipse([cx - bh * 0.22, y1 - bh * 0.3, cx + bh * 0.22, y1 + bh * 0.12], fill=(20, 20, 20))
        else:
            lamp = (250, 250, 220) if view == "front" else (220, 30, 30)
            for fx in (0.12, 0.78):
                d.rectangle([x0 + bw * fx, y1 - bh * 0.35, x0 + bw * (fx + 0.1), y1 - bh * 0.25], fill=lamp)
            if view == "front":
                d.rectangle([x0 + bw * 0.35, y1 - bh * 0.32, x0 + bw * 0.65, y1 - bh * 0.18], fill=(60, 60, 60))
            for fx in (0.08, 0.82):
                d.rectangle([x0 + bw * fx, y1 - bh * 0.1, x0 + bw * (fx + 0.1), y1 + bh * 0.05], fill=(20, 20, 20))


def render_vehicle(vehicle: Vehicle, scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A vehicle crop of varying size (VeRi-776 crops range from about 100 to 400 pixels)."""
    w = int(rng.integers(110, 300))
    h = int(w * rng.uniform(0.7, 1.05))
    img = scene.background(w * 2, h * 2, rng)
    d = ImageDraw.Draw(img)
    view = VIEWS[(scene.view_bias + int(rng.integers(0, 3))) % 4]
    vehicle.draw(d, w * 2, h * 2, view)
    _occlude(d, w * 2, h * 2, rng, p=0.2)
    return scene.finish(img.resize((w, h), Image.BILINEAR), rng)
