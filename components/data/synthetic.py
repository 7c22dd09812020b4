"""A seeded cross-domain world of shapes with text queries (the default benchmark).

Source and target differ in exactly the three ways SDA (Section 1) names, each with a knob in
``params.yaml: data.gap``:

* content shift (``content_shift``): category and colour frequencies are skewed in opposite
  directions in the two domains;
* uni-modal gaps: visual (``visual_gap``: textured background, lighting / colour cast, blur,
  noise on the target) and language (``language_gap``: this share of the vocabulary is always
  replaced by a synonym in target queries, which also use other sentence templates with this
  probability);
* cross-modal relation bias (``relation_bias``): source queries mostly name colours, target
  queries mostly name categories, sizes and spatial relations.

Benchmark v4: an image carries ``queries_per_image`` queries (default 4; each query is one
sample row, the rows of an image share its ``image_id``), as a RefCOCO image carries several
expressions of several objects; every image lies in one split. At one query per image the
generator gives benchmark v3 exactly.

Every image is generated from its own ``SeedSequence((seed, domain, split, image))``, so the
data does not depend on sharding or on which Ray worker made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from skimage.filters import gaussian

from components.config import DataConfig, GapConfig

# ids 1..6. The content shift favours the first entries on source and the last on target, so
# the order mixes easy and thin shapes at both ends: neither domain gets only the hard ones.
CATEGORIES = ["circle", "ring", "square", "cross", "triangle", "diamond"]
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
COLOR_NAMES = list(COLORS)
SIZES = {"small": (0.10, 0.13), "large": (0.16, 0.21)}  # radius as a fraction of the image side
RELATIONS = ["left of", "right of", "above", "below"]

# Target-domain vocabulary (language gap): never used by source queries.
SYNONYMS = {  # one target word per source word: a vocabulary shift, not a sparser vocabulary
    "circle": ["ball"],
    "square": ["box"],
    "triangle": ["wedge"],
    "diamond": ["rhombus"],
    "cross": ["plus"],
    "ring": ["donut"],
    "red": ["crimson"],
    "green": ["emerald"],
    "blue": ["navy"],
    "yellow": ["golden"],
    "purple": ["violet"],
    "orange": ["amber"],
    "large": ["big"],
    "small": ["tiny"],
    "shape": ["object"],
    "shapes": ["objects"],
    "left of": ["to the left of"],
    "right of": ["to the right of"],
    "above": ["over"],
    "below": ["under"],
}


def plural(noun: str) -> str:
    """The generator's plural of a category noun ("cross" -> "crosses")."""
    return noun + ("es" if noun.endswith("s") else "s")


def synonym_map() -> dict[str, str]:
    """Target word -> the source word it replaces, for the single-word synonyms (what word
    grounding should find; a diagnostic)."""
    return {t[0]: s for s, t in SYNONYMS.items() if " " not in t[0] and " " not in s}


#: Words of a query that name the referred entity: the category nouns, their plurals and their
#: target-domain synonyms (plurals are never swapped for a synonym, see ``_translate``). The
#: generic "shape" / "object" name no entity. DMMI erases one of these at training time.
ENTITY_NOUNS: frozenset[str] = frozenset(
    [*CATEGORIES, *map(plural, CATEGORIES), *(SYNONYMS[c][0] for c in CATEGORIES)]
)
SOURCE_TEMPLATES = ["the {d}"]
TARGET_TEMPLATES = ["find the {d}", "segment the {d}", "where is the {d}", "show me the {d}"]
SOURCE_MANY = ["all the {d}", "all {d}"]
TARGET_MANY = ["every {d}", "each of the {d}", "find all {d}"]

# Description styles, with the weight each domain gives them at relation_bias = 1.
# Source names an object by its colour alone where target names it by its category alone;
# sizes and spatial relations are equally common in both, so that neither domain's task is
# intrinsically much harder than the other's.
STYLES = ["color", "color_cat", "size_color_cat", "category", "size_cat", "relation"]
SOURCE_STYLE_W = np.array([0.30, 0.35, 0.15, 0.05, 0.05, 0.10])
TARGET_STYLE_W = np.array([0.05, 0.35, 0.15, 0.30, 0.05, 0.10])

DOMAINS = {"source": 0, "target": 1}
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class Obj:
    category: int  # index into CATEGORIES
    color: int  # index into COLOR_NAMES
    size: str
    cx: float
    cy: float
    r: float
    mask: np.ndarray | None = None  # visible pixels after occlusion


# --------------------------------------------------------------------------- distributions
def content_weights(n: int, shift: float, domain: str) -> np.ndarray:
    """Category / colour frequencies: uniform at shift 0, opposite linear skews at shift 1."""
    ramp = np.arange(n, 0, -1, dtype=float)  # source favours the first entries
    ramp = ramp if domain == "source" else ramp[::-1]
    skew = ramp**2 / (ramp**2).sum()
    return (1 - shift) / n + shift * skew


def style_weights(bias: float, domain: str) -> np.ndarray:
    """Description-style weights: shared uniform mix at bias 0, domain-specific at bias 1."""
    uniform = np.full(len(STYLES), 1 / len(STYLES))
    own = SOURCE_STYLE_W if domain == "source" else TARGET_STYLE_W
    w = (1 - bias) * uniform + bias * own
    return w / w.sum()


# --------------------------------------------------------------------------- rendering
def shape_mask(cat: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(float) + 0.5
    dx, dy = xx - cx, yy - cy
    if cat == "circle":
        return dx**2 + dy**2 <= r**2
    if cat == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if cat == "triangle":
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    if cat == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if cat == "cross":
        w = 0.4 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if cat == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.45 * r) ** 2)
    raise ValueError(f"unknown category {cat!r}")


def render(objs: list[Obj], size: int, gap: GapConfig, domain: str, rng) -> np.ndarray:
    """Paint objects in order (later ones occlude earlier) and apply the domain's style."""
    v = gap.visual_gap if domain == "target" else 0.0
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(200, 235)
    img = np.full((size, size, 3), base, dtype=float)
    img += rng.normal(0, 3, size=(size, size, 1))
    if v > 0:
        # textured, tinted background: stripes at a random angle and frequency
        theta, freq = rng.uniform(0, np.pi), rng.uniform(4, 10)
        stripes = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        tint = rng.uniform(60, 200, size=3)
        img = (1 - 0.5 * v) * img + 0.5 * v * (tint + 40 * stripes[..., None])
    semantic = np.zeros((size, size), dtype=np.uint8)
    for obj in objs:
        m = shape_mask(CATEGORIES[obj.category], obj.cx, obj.cy, obj.r, size)
        colour = np.array(COLORS[COLOR_NAMES[obj.color]], dtype=float) + rng.normal(0, 8, 3)
        img[m] = colour
        semantic[m] = obj.category + 1
        obj.mask = m
    for i, obj in enumerate(objs):  # visible part = not covered by later objects
        for later in objs[i + 1 :]:
            obj.mask = obj.mask & ~later.mask
    if v > 0:
        # mild enough that colour names stay true: the style changes, the content does not
        gains = 1 + rng.uniform(-0.15, 0.15, size=3) * v  # colour cast
        light = 1 + 0.3 * v * (xx - 0.5) * rng.choice([-1, 1])  # lighting gradient
        img = img * gains * light[..., None]
        img = gaussian(img, sigma=0.3 * v, channel_axis=-1, preserve_range=True)
        img += rng.normal(0, 4 * v, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), semantic


def place_objects(n: int, cfg: DataConfig, domain: str, rng) -> list[Obj]:
    size = cfg.image_size
    cat_w = content_weights(len(CATEGORIES), cfg.gap.content_shift, domain)
    col_w = content_weights(len(COLOR_NAMES), cfg.gap.content_shift, domain)
    objs: list[Obj] = []
    for _ in range(n):
        for _attempt in range(30):
            sz = rng.choice(list(SIZES))
            r = rng.uniform(*SIZES[sz]) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(np.hypot(cx - o.cx, cy - o.cy) > 0.8 * (r + o.r) for o in objs):
                break
        cat = int(rng.choice(len(CATEGORIES), p=cat_w))
        col = int(rng.choice(len(COLOR_NAMES), p=col_w))
        objs.append(Obj(cat, col, sz, cx, cy, r))
    return objs


# --------------------------------------------------------------------------- queries
def _attrs(obj: Obj, style: str) -> dict:
    full = {"color": obj.color, "category": obj.category, "size": obj.size}
    keys = {
        "color": ["color"],
        "color_cat": ["color", "category"],
        "size_color_cat": ["size", "color", "category"],
        "category": ["category"],
        "size_cat": ["size", "category"],
    }[style]
    return {k: full[k] for k in keys}


def _matches(obj: Obj, attrs: dict) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def _holds(a: Obj, b: Obj, rel: str) -> bool:
    margin = 0.5 * (a.r + b.r)
    return {
        "left of": a.cx < b.cx - margin,
        "right of": a.cx > b.cx + margin,
        "above": a.cy < b.cy - margin,
        "below": a.cy > b.cy + margin,
    }[rel]


def _phrase(attrs: dict, many: bool = False) -> list[str]:
    words = []
    if "size" in attrs:
        words.append(attrs["size"])
    if "color" in attrs:
        words.append(COLOR_NAMES[attrs["color"]])
    if "category" in attrs:
        noun = CATEGORIES[attrs["category"]]
        words.append(plural(noun) if many else noun)
    else:
        words.append("shapes" if many else "shape")
    return words


def _describe_one(objs: list[Obj], t: int, styles: list[str], rng) -> list[str] | None:
    """Words of the first description style (in ``styles`` order) that picks out only ``t``."""
    target = objs[t]
    for style in styles:
        if style != "relation":
            attrs = _attrs(target, style)
            if sum(_matches(o, attrs) for o in objs) == 1:
                return _phrase(attrs)
            continue
        anchors = [b for b in range(len(objs)) if b != t]
        for b in rng.permutation(anchors) if anchors else []:
            for rel in rng.permutation(RELATIONS):
                if not _holds(target, objs[b], rel):
                    continue
                a_attrs = _attrs(target, "color_cat")
                b_attrs = _attrs(objs[b], "color_cat")
                hits = [
                    i
                    for i, o in enumerate(objs)
                    if _matches(o, a_attrs)
                    and any(_holds(o, x, rel) for x in objs if x is not o and _matches(x, b_attrs))
                ]
                if hits == [t]:
                    return [*_phrase(a_attrs), str(rel), "the", *_phrase(b_attrs)]
    return None


def shifted_words(gap: float) -> set[str]:
    """The source words the target domain always says differently: a fixed share ``gap`` of
    the vocabulary (a fixed order, so a larger gap only adds words). A word is either always
    or never swapped, so the target vocabulary is no larger than the source's: the language
    gap makes the target unfamiliar, not harder to learn."""
    order = sorted(SYNONYMS, key=lambda w: hashlib.sha256(w.encode()).hexdigest())
    return set(order[: round(gap * len(order))])


def _translate(words: list[str], gap: float, domain: str, rng) -> str:
    """Join description words, swapping in the target synonym of every shifted word.

    Multi-word phrases ("left of") arrive as one element, so they are swapped as a unit.
    """
    if domain == "target" and gap > 0:
        shifted = shifted_words(gap)
        words = [str(SYNONYMS[w][0]) if w in shifted else w for w in words]
    return " ".join(words)


def make_query(
    objs: list[Obj], kind: str, cfg: DataConfig, domain: str, rng, referent: int | None = None
):
    """Return (query text, referred object indices) or None if this image cannot host ``kind``.

    ``referent``: the object a one-to-one query must describe (None: a random one)."""
    gap = cfg.gap
    w = style_weights(gap.relation_bias, domain)
    styles = list(rng.choice(STYLES, size=len(STYLES), replace=False, p=w))
    # the language gap also changes sentence templates, not only words
    alt = domain == "target" and rng.random() < gap.language_gap
    if kind == "one":
        if not objs:
            return None
        t = int(rng.integers(len(objs))) if referent is None else referent
        words = _describe_one(objs, t, styles, rng)
        if words is None:
            return None
        template = str(rng.choice(TARGET_TEMPLATES if alt else SOURCE_TEMPLATES))
        return template.format(d=_translate(words, gap.language_gap, domain, rng)), [t]
    if kind == "many":
        groups: dict[tuple, list[int]] = {}
        for i, o in enumerate(objs):
            for style in ("color", "category", "color_cat"):
                key = tuple(sorted(_attrs(o, style).items()))
                groups.setdefault(key, []).append(i)
        options = [(k, v) for k, v in groups.items() if len(v) >= 2]
        if not options:
            return None
        key, idx = options[int(rng.integers(len(options)))]
        template = str(rng.choice(TARGET_MANY if alt else SOURCE_MANY))
        words = _phrase(dict(key), many=True)
        return template.format(d=_translate(words, gap.language_gap, domain, rng)), idx
    # zero: a colour + category that is not in the image
    present = {(o.color, o.category) for o in objs}
    for _ in range(20):
        attrs = {
            "color": int(rng.integers(len(COLOR_NAMES))),
            "category": int(rng.integers(len(CATEGORIES))),
        }
        if (attrs["color"], attrs["category"]) not in present:
            template = str(rng.choice(TARGET_TEMPLATES if alt else SOURCE_TEMPLATES))
            return template.format(d=_translate(_phrase(attrs), gap.language_gap, domain, rng)), []
    return None


# --------------------------------------------------------------------------- samples
def _image_queries(objs: list[Obj], kinds: list[str], cfg: DataConfig, domain: str, rng):
    """One query per slot of ``kinds`` on one image, or None if the image cannot host them.

    One-to-one slots share referents ``expressions_per_object`` at a time, so an image has
    several referred objects and each of them more than one expression (as in RefCOCO); a
    second expression of an object is drawn again (other styles) when it repeats the first.
    """
    perm = rng.permutation(len(objs)) if objs else np.array([], dtype=int)
    per = cfg.expressions_per_object
    out, seen = [], set()
    for slot, kind in enumerate(kinds):
        referent = None
        if kind == "one":
            j = kinds[:slot].count("one")
            if len(perm) == 0:
                return None
            referent = int(perm[min(j // per, len(perm) - 1)])
        for attempt in range(8):
            # an object no description singles out gives way to another one
            who = referent if attempt < 4 else None
            q = make_query(objs, kind, cfg, domain, rng, referent=who)
            if q is not None and q[0] not in seen:
                break
        if q is None:
            return None
        seen.add(q[0])
        out.append(q)
    return out


def _sample(objs, image, semantic, kind, query, referred, domain, split, sid, image_id):
    target = np.zeros(semantic.shape, dtype=bool)
    for i in referred:
        target |= objs[i].mask
    return {
        "sample_id": sid,
        "image_id": image_id,
        "domain": domain,
        "split": split,
        "image": image,
        "semantic": semantic,
        "query": query,
        "query_type": kind,
        "target": target,
        "target_categories": [objs[i].category + 1 for i in referred],
        "instances": [o.mask for o in objs],
        "instance_categories": [o.category + 1 for o in objs],
    }


def generate_image(cfg: DataConfig, seed: int, domain: str, split: str, image: int) -> list[dict]:
    """The ``cfg.queries_per_image`` samples of one image, as plain arrays: image, semantic
    map, instance masks, and per sample its query and target mask.

    Sample ``k`` of image ``i`` has index ``i * queries_per_image + k`` in its split. At one
    query per image, sample ``i`` is exactly benchmark v3's sample ``i`` (same draws, and its
    image id is its sample id).
    """
    q = cfg.queries_per_image
    rng = np.random.default_rng(
        np.random.SeedSequence((seed, DOMAINS[domain], SPLITS[split], image))
    )
    mix = cfg.query_mix
    kinds = [
        str(rng.choice(["one", "many", "zero"], p=[mix.one, mix.many, mix.zero])) for _ in range(q)
    ]
    for _attempt in range(200):
        need = 2 if "many" in kinds else 1 if "one" in kinds else 0
        lo = max(cfg.min_objects, need)
        n = int(rng.integers(lo, max(lo, cfg.max_objects) + 1))
        objs = place_objects(n, cfg, domain, rng)
        if "many" in kinds and len(objs) >= 2 and rng.random() < 0.5:
            objs[1].color = objs[0].color  # guarantee a shared attribute half of the time
        pixels, semantic = render(objs, cfg.image_size, cfg.gap, domain, rng)
        objs = [o for o in objs if o.mask.any()]
        if q == 1:
            one = make_query(objs, kinds[0], cfg, domain, rng)
            queries = None if one is None else [one]
        else:
            queries = _image_queries(objs, kinds, cfg, domain, rng)
        if queries is not None:
            break
    else:  # pragma: no cover - guarded by the attempt budget above
        raise RuntimeError(f"could not generate image {domain}/{split}/{image} ({kinds})")
    samples = []
    for k, (kind, (query, referred)) in enumerate(zip(kinds, queries, strict=True)):
        sid = f"{domain}-{split}-{image * q + k:06d}"
        image_id = sid if q == 1 else f"{domain}-{split}-image{image:06d}"
        samples.append(
            _sample(objs, pixels, semantic, kind, query, referred, domain, split, sid, image_id)
        )
    return samples


def generate_range(cfg: DataConfig, seed: int, domain: str, split: str, start: int, stop: int):
    """Samples ``start`` to ``stop - 1`` of a split (an image cut by either end is generated
    whole, its other samples dropped)."""
    q = cfg.queries_per_image
    out = []
    for image in range(start // q, (stop - 1) // q + 1):
        for k, s in enumerate(generate_image(cfg, seed, domain, split, image)):
            if start <= image * q + k < stop:
                out.append(s)
    return out


def generate_sample(cfg: DataConfig, seed: int, domain: str, split: str, index: int) -> dict:
    """Sample ``index`` of a split (see ``generate_image``)."""
    return generate_range(cfg, seed, domain, split, index, index + 1)[0]
