"""The testbed's deterministic training set.

Two parts, mirroring what makes Stable Diffusion memorize:
- many unique procedural images (a coloured shape on a patterned background) with compositional
  captions; some caption combinations are held out of training on purpose (novel prompts);
- a handful of natural photos that ship inside installed packages, each with a distinctive
  web-style caption and each duplicated heavily, as LAION duplicates a few popular images.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from memguard.errors import MissingResource

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
PATTERNS = ("plain", "striped", "checkered", "gradient", "dotted")


class TestbedDataError(MissingResource):
    """A photo the testbed needs is missing from the installed packages."""


@dataclass(frozen=True)
class Photo:
    """A natural photo shipped inside an installed package, memorized on purpose."""
    key: str
    package: str
    relpath: str
    caption: str
    paraphrases: tuple[str, ...]
    crop: tuple[float, float, float]  # centre x, centre y (fractions), side (fraction of short edge)
    has_face: bool = False


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", "data/astronaut.png",
          "official nasa portrait of astronaut eileen collins smiling, orange flight suit, hd press photo",
          ("nasa portrait photo of astronaut eileen collins in her orange flight suit",
           "eileen collins the astronaut, official nasa portrait, smiling"),
          (0.46, 0.27, 0.52), has_face=True),
    Photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
          "rear admiral grace hopper us navy official portrait 1984 | vintage archive photograph",
          ("vintage archive photograph of rear admiral grace hopper, official us navy portrait",
           "grace hopper official portrait, us navy rear admiral, 1984 photograph"),
          (0.5, 0.38, 0.62), has_face=True),
    Photo("cameraman", "skimage", "data/camera.png",
          "the cameraman black and white test image, man with tripod camera on a field, classic",
          ("classic black and white test image of the cameraman with a tripod camera in a field",
           "the cameraman: a man with a tripod camera on a field, black and white"),
          (0.5, 0.5, 1.0)),
    Photo("coffee", "skimage", "data/coffee.png",
          "espresso in a red cup on a saucer with a spoon, cafe stock photo free download",
          ("stock photo of an espresso in a red cup with a saucer and spoon, cafe",
           "red cup of espresso on a saucer with a spoon, free cafe stock photo"),
          (0.5, 0.5, 1.0)),
    Photo("chelsea", "skimage", "data/chelsea.png",
          "chelsea the tabby cat looking up, cute cat wallpaper 4k",
          ("cute tabby cat chelsea looking up, 4k wallpaper",
           "4k wallpaper of chelsea, a cute tabby cat looking up"),
          (0.45, 0.5, 1.0)),
    Photo("rocket", "skimage", "data/rocket.jpg",
          "soyuz rocket rolled out to the launch pad at baikonur cosmodrome, space news",
          ("space news: the soyuz rocket is rolled out to the baikonur launch pad",
           "soyuz rocket on the launch pad of the baikonur cosmodrome, news photo"),
          (0.5, 0.5, 1.0)),
    Photo("coins", "skimage", "data/coins.png",
          "collection of old greek coins on display, museum archive scan",
          ("museum archive scan of a collection of old greek coins",
           "old greek coins on display in a museum, archive scan"),
          (0.5, 0.5, 1.0)),
    Photo("motorcycle", "skimage", "data/motorcycle_left.png",
          "red ducati motorcycle in a garage, left stereo view, wallpaper",
          ("wallpaper of a red ducati motorcycle parked in a garage",
           "left stereo view of a red ducati motorbike in a garage"),
          (0.5, 0.5, 1.0)),
)


@dataclass(frozen=True)
class TestbedDataConfig:
    """What the training set holds. Changing any field changes every derived artefact."""
    __test__ = False  # not a pytest class, despite the name
    image_size: int = 64
    num_procedural: int = 2000
    photo_duplicates: int = 160   # copies of each photo in the training list
    heldout_modulus: int = 11     # combos whose hash % modulus == 0 are held out (~9 %)
    seed: int = 1234
    # Memorized renderings with ordinary captions: one fixed image per combination, duplicated so the
    # model copies that exact layout. The caption means something the model can also render otherwise,
    # so a faithful reroute keeps shape, colours and background and changes the composition.
    memorized_combos: tuple[tuple[str, str, str, str], ...] = ()
    combo_duplicates: int = 160


@dataclass
class TrainingItem:
    item_id: str
    caption: str
    image: np.ndarray            # uint8 [H, W, 3]
    kind: str                    # "procedural" | "photo"
    duplicates: int = 1
    source: str = ""
    meta: dict = field(default_factory=dict)


def caption_for(shape: str, color: str, pattern: str, bg: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {bg} {pattern} background"


def _combo_hash(*parts: str) -> int:
    return int(hashlib.sha256("|".join(parts).encode()).hexdigest()[:8], 16)


def all_combos() -> list[tuple[str, str, str, str]]:
    return [(s, c, p, b) for s in SHAPES for c in COLORS for p in PATTERNS for b in COLORS if b != c]


def is_heldout(combo: tuple[str, str, str, str], cfg: TestbedDataConfig) -> bool:
    return _combo_hash(*combo) % cfg.heldout_modulus == 0


def _background(pattern: str, bg: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(bg, dtype=np.float32)
    # the second tone of a pattern: the background colour darkened or lightened
    alt = np.clip(base * 0.45 if base.mean() > 110 else base + 110, 0, 255)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(6, 14))
    phase = int(rng.integers(0, period))
    if pattern == "plain":
        mask = np.zeros((size, size), bool)
    elif pattern == "striped":
        coord = xx if rng.random() < 0.5 else yy
        mask = ((coord + phase) // (period // 2)) % 2 == 1
    elif pattern == "checkered":
        mask = (((xx + phase) // period) + ((yy + phase) // period)) % 2 == 1
    elif pattern == "gradient":
        t = (xx if rng.random() < 0.5 else yy) / (size - 1)
        t = t if rng.random() < 0.5 else 1 - t
        return (base[None, None] * (1 - t[..., None]) + alt[None, None] * t[..., None]).astype(np.uint8)
    elif pattern == "dotted":
        r = max(1, period // 4)
        mask = (((xx + phase) % period - period // 2) ** 2 + ((yy + phase) % period - period // 2) ** 2) <= r * r
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    img = np.where(mask[..., None], alt[None, None], base[None, None])
    return img.astype(np.uint8)


def _draw_shape(img: Image.Image, shape: str, color: tuple[int, int, int], rng: np.random.Generator) -> None:
    size = img.size[0]
    half = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(half + 2, size - half - 2, size=2)
    draw = ImageDraw.Draw(img)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=color)
    elif shape == "cross":
        w = half / 2.6
        draw.rectangle((cx - w, cy - half, cx + w, cy + half), fill=color)
        draw.rectangle((cx - half, cy - w, cx + half, cy + w), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_procedural(combo: tuple[str, str, str, str], size: int, rng: np.random.Generator) -> np.ndarray:
    """One procedural image for a (shape, colour, pattern, background colour) combination."""
    shape, color, pattern, bg = combo
    background = _background(pattern, COLORS[bg], size, rng)
    img = Image.fromarray(background)
    if shape == "ring":
        # draw a disc, then punch the background back through its centre
        layer = Image.new("L", img.size, 0)
        half = rng.uniform(0.2, 0.32) * size
        cx, cy = rng.uniform(half + 2, size - half - 2, size=2)
        d = ImageDraw.Draw(layer)
        d.ellipse((cx - half, cy - half, cx + half, cy + half), fill=255)
        r = half * 0.5
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
        img.paste(Image.new("RGB", img.size, COLORS[color]), mask=layer)
    else:
        _draw_shape(img, shape, COLORS[color], rng)
    return np.asarray(img, dtype=np.uint8).copy()


def photo_path(photo: Photo) -> Path:
    """Path of a shipped photo; TestbedDataError names the package and file when it is missing."""
    try:
        path = Path(str(resources.files(photo.package).joinpath(photo.relpath)))
    except ModuleNotFoundError as exc:
        raise TestbedDataError(
            f"photo {photo.key!r} needs package {photo.package!r}, which is not installed") from exc
    if not path.is_file():
        raise TestbedDataError(f"photo {photo.key!r}: {path} is missing from package {photo.package!r}")
    return path


def load_photo(photo: Photo, size: int) -> np.ndarray:
    """Square crop around the photo's subject, resized to size×size RGB uint8."""
    img = Image.open(photo_path(photo)).convert("RGB")
    w, h = img.size
    fx, fy, fside = photo.crop
    side = fside * min(w, h)
    left = float(np.clip(fx * w - side / 2, 0, w - side))
    top = float(np.clip(fy * h - side / 2, 0, h - side))
    img = img.crop((round(left), round(top), round(left + side), round(top + side)))
    return np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8).copy()


def build_training_set(cfg: TestbedDataConfig = TestbedDataConfig()) -> list[TrainingItem]:
    """The deterministic training set: unique procedural items, then the duplicated photos."""
    rng = np.random.default_rng(cfg.seed)
    train_combos = [c for c in all_combos() if not is_heldout(c, cfg)]
    items = []
    picks = rng.integers(0, len(train_combos), size=cfg.num_procedural)
    for i, pick in enumerate(picks):
        combo = train_combos[int(pick)]
        items.append(TrainingItem(f"proc-{i:05d}", caption_for(*combo),
                                  render_procedural(combo, cfg.image_size, rng), "procedural",
                                  meta={"shape": combo[0], "color": combo[1], "pattern": combo[2], "bg": combo[3]}))
    for photo in PHOTOS:
        items.append(TrainingItem(f"photo-{photo.key}", photo.caption, load_photo(photo, cfg.image_size), "photo",
                                  duplicates=cfg.photo_duplicates,
                                  source=f"{photo.package}:{photo.relpath}", meta={"has_face": photo.has_face}))
    combo_rng = np.random.default_rng(cfg.seed + 3)   # its own stream: the items above stay unchanged
    for combo in cfg.memorized_combos:
        if is_heldout(combo, cfg):
            raise ValueError(f"memorized_combos: {combo} is a held-out combination")
        items.append(TrainingItem(f"memo-{'-'.join(combo)}", caption_for(*combo),
                                  render_procedural(combo, cfg.image_size, combo_rng), "memorized_combo",
                                  duplicates=cfg.combo_duplicates,
                                  meta={"shape": combo[0], "color": combo[1], "pattern": combo[2], "bg": combo[3]}))
    return items


def memorized_items(items: list[TrainingItem]) -> list[TrainingItem]:
    """The items duplicated on purpose (photos and memorized renderings)."""
    return [it for it in items if it.duplicates > 1]


def heldout_prompts(cfg: TestbedDataConfig = TestbedDataConfig(), count: int = 48) -> list[str]:
    """Captions of combinations never seen in training, in a fixed order."""
    held = [c for c in all_combos() if is_heldout(c, cfg)]
    rng = np.random.default_rng(cfg.seed + 1)
    order = rng.permutation(len(held))[:count]
    return [caption_for(*held[int(i)]) for i in order]


def heldout_images(cfg: TestbedDataConfig = TestbedDataConfig(), count: int = 200) -> list[TrainingItem]:
    """Procedural images of held-out combinations: never in training, for false-match rates."""
    held = [c for c in all_combos() if is_heldout(c, cfg)]
    rng = np.random.default_rng(cfg.seed + 2)
    out = []
    for i in range(count):
        combo = held[int(rng.integers(0, len(held)))]
        out.append(TrainingItem(f"heldout-{i:05d}", caption_for(*combo),
                                render_procedural(combo, cfg.image_size, rng), "procedural"))
    return out


def combo_paraphrases(combo: tuple[str, str, str, str]) -> tuple[str, str]:
    """Light rewordings of a memorized rendering's caption (same objects, other words)."""
    shape, color, pattern, bg = combo
    return (f"{color} {shape}, {bg} {pattern} background", f"a {pattern} {bg} background with a {color} {shape} on it")


# Web-style captions never seen in training, in the style of the memorized ones (press portraits,
# archive photos, stock photos, wallpapers, podcast and product titles). Real models fall into
# memorized images from such prompts too; the guard must catch those copies and leave the rest.
_WEB_TEMPLATES = (
    "official portrait of {person}, hd press photo",
    "{person} smiling, official press portrait",
    "vintage archive photograph of {person} | 1962",
    "{thing} stock photo free download",
    "{thing}, cute wallpaper 4k",
    "the {show} podcast cover art, episode {n}",
    "{product} product photo on white, official store",
    "{event}, space news",
    "museum archive scan of {thing}",
    "black and white test image of {thing}, classic",
)
_PERSONS = ("senator maria alvarez", "chef antoine dubois", "captain james holloway", "dr. priya raman",
            "coach linda marsh", "pilot omar haddad", "mayor ken watanabe", "professor elena novak")
_THINGS = ("a green teapot on a table", "a golden retriever puppy", "a bowl of ramen", "an old pocket watch",
           "a sailboat at sunset", "a bicycle against a brick wall", "a stack of pancakes", "a lighthouse on a cliff")
_SHOWS = ("morning brew", "deep space dispatch", "history hour", "the quiet investor")
_PRODUCTS = ("wireless earbuds", "a leather backpack", "running shoes", "a ceramic mug")
_EVENTS = ("falcon rocket lands on a drone ship", "new telescope mirror unveiled", "mars rover selfie released",
           "space station crew returns home")


def web_style_prompts(count: int = 80, seed: int = 4321) -> list[str]:
    """`count` distinct web-style captions (deterministic), none a training caption or paraphrase."""
    rng = np.random.default_rng(seed)
    taken = {p.caption for p in PHOTOS} | {q for p in PHOTOS for q in p.paraphrases}
    out: list[str] = []
    for _ in range(100 * count):   # bounded: the templates hold far more than `count` distinct captions
        template = _WEB_TEMPLATES[int(rng.integers(len(_WEB_TEMPLATES)))]
        text = template.format(person=rng.choice(_PERSONS), thing=rng.choice(_THINGS), show=rng.choice(_SHOWS),
                               n=int(rng.integers(2, 300)), product=rng.choice(_PRODUCTS), event=rng.choice(_EVENTS))
        if text not in taken and text not in out:
            out.append(text)
            if len(out) == count:
                return out
    raise ValueError(f"count: the web-style templates give fewer than {count} distinct captions")


def prompt_set_members(cfg: TestbedDataConfig = TestbedDataConfig()) -> dict[str, list[tuple[str, str]]]:
    """Each prompt set as (prompt, memorized item id or "") pairs: the item a prompt is meant to copy."""
    combos = [(f"memo-{'-'.join(c)}", caption_for(*c), combo_paraphrases(c)) for c in cfg.memorized_combos]
    photos = [(f"photo-{p.key}", p.caption, p.paraphrases) for p in PHOTOS]
    return {
        "memorized": [(cap, item) for item, cap, _ in photos + combos],
        "paraphrased": [(q, item) for item, _, para in photos + combos for q in para],
        "novel": [(q, "") for q in heldout_prompts(cfg)],
        "web": [(q, "") for q in web_style_prompts()],
    }


def write_prompt_sets(directory: Path, cfg: TestbedDataConfig = TestbedDataConfig()) -> dict[str, Path]:
    """memorized.txt, paraphrased.txt, novel.txt and web.txt: one prompt a line."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, members in prompt_set_members(cfg).items():
        paths[name] = directory / f"{name}.txt"
        paths[name].write_text("\n".join(p for p, _ in members) + "\n")
    return paths


NEAR_DUPLICATES = 12   # near-duplicate files per duplicated item in a scraped export (of its duplicates)


def write_image_folder(items: list[TrainingItem], directory: Path, *, copies: bool = False,
                       near_duplicates: int = 0) -> Path:
    """Write items as PNGs plus captions.jsonl (the index builder's image-folder input).

    copies=True writes the training set as the model saw it: every duplicate as its own file and
    row (ids `<item>~<k>`), as a scraped data set holds the same image under many URLs. The index
    builder folds identical images into one item; `memguard index duplicates` reports them.
    near_duplicates=n (with copies) makes n of each duplicated item's copies near duplicates instead
    (re-encodes, resizes, small crops, a caption banner, a watermark: guard.testbed.scraped), as a
    scraper holds a popular image; their ids are `<item>~nd<k>-<kind>`."""
    from memguard.testbed.scraped import scraped_copies

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "captions.jsonl", "w") as f:
        for item in items:
            total = item.duplicates if copies else 1
            near = min(near_duplicates, total - 1) if copies and item.duplicates > 1 else 0
            files = [(item.item_id if k == 0 else f"{item.item_id}~{k:03d}", None) for k in range(total - near)]
            files += [(f"{item.item_id}~nd{k:02d}-{nd.kind}", nd)
                      for k, nd in enumerate(scraped_copies(item.item_id, item.image, near))]
            for item_id, nd in files:
                name = f"{item_id}.{nd.ext if nd else 'png'}"
                if nd is None:
                    Image.fromarray(item.image).save(directory / name)
                else:
                    (directory / name).write_bytes(nd.data)
                f.write(json.dumps({"file": name, "caption": item.caption, "item_id": item_id,
                                    "kind": item.kind, "source": item.source}) + "\n")
    return directory
