"""The dedup steps as Beam PTransforms over sample records.

Each transform takes a PCollection of records and returns a ``StageOutput`` with the records
that pass and the rejects it produced, so each one also works alone. Global steps shuffle
records by a key (URL, sha256, node id) instead of collecting anything on one worker.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import apache_beam as beam
import numpy as np

from bm6b.dedup import captions as caption_keys
from bm6b.dedup import phash as ph
from bm6b.dedup.components import DEFAULT_ROUNDS, ConnectedComponents
from bm6b.dedup.config import DEFAULT_RADIUS, DedupConfig
from bm6b.dedup.evalsets import EvalIndex, load_eval_sets
from bm6b.dedup.rank import keep_rank, node_extra, node_id, node_key
from bm6b.pipelines.stages import RejectingDoFn, StageOutput, split_rejects
from bm6b.schemas import Reason, normalize_url

logger = logging.getLogger(__name__)

STAGE_URL = "dedup_url"
STAGE_IMAGE = "dedup_image"
STAGE_EVAL = "decontam"
STAGE_NEAR_IMAGE = "dedup_near_image"
STAGE_CAPTION = "dedup_caption"

# Distinct pHash codes per band step input element; a batch of 65,536 codes is 512 KB.
CODE_BATCH = 1 << 16

# ---------------------------------------------------------------- keep one per key


class _KeepOne(RejectingDoFn):
    """Keep the best-ranked record of each group; reject the rest with the kept key in the detail."""

    def __init__(self, stage: str, reason: str, what: str):
        self.stage = stage
        self.reason = reason
        self.what = what

    def process(self, group: tuple[str, Iterable[dict[str, Any]]]):
        _, members = group
        ordered = sorted(members, key=keep_rank)
        self._in.inc(len(ordered))
        kept = ordered[0]
        self._out.inc()
        yield kept
        for duplicate in ordered[1:]:
            yield self._reject(duplicate, self.reason, f"same {self.what} as kept key {kept['key']}")


def _own_group(record: dict[str, Any]) -> tuple[int, str]:
    """Group key of a record that lacks the compared value, unique so it matches no other record."""
    return (1, record["key"])


def _url_key(record: dict[str, Any]) -> tuple[int, str]:
    url = record.get("url")
    if not url:
        return _own_group(record)
    try:
        return (0, normalize_url(url))
    except ValueError:
        return (0, url)


def _sha256_key(record: dict[str, Any]) -> tuple[int, str]:
    sha256 = record.get("sha256")
    if not sha256:
        return _own_group(record)
    return (0, sha256)


class DedupUrls(beam.PTransform):
    """Keep one sample per normalized URL (see ``normalize_url``); reject the rest as duplicate_url.

    Runs before download, so each image is fetched once. The kept sample follows the
    representative rule; before download only "has both captions" and the key can decide.
    """

    def expand(self, records):
        grouped = records | "ByUrl" >> beam.Map(lambda r: (_url_key(r), r)) | "Group" >> beam.GroupByKey()
        return split_rejects(grouped, "KeepOne", _KeepOne(STAGE_URL, Reason.DUPLICATE_URL.value, "normalized URL"))


class DedupExactImages(beam.PTransform):
    """Keep one sample per image sha256 across the whole run; reject the rest as duplicate_image."""

    def expand(self, records):
        grouped = records | "BySha256" >> beam.Map(lambda r: (_sha256_key(r), r)) | "Group" >> beam.GroupByKey()
        return split_rejects(grouped, "KeepOne", _KeepOne(STAGE_IMAGE, Reason.DUPLICATE_IMAGE.value, "sha256"))


# ---------------------------------------------------------------- near-duplicate images


def _image_node(record: dict[str, Any]) -> str:
    return node_id(record, extra=f"{int(record['phash']):016x}")


def _signed_code(record: dict[str, Any]) -> int:
    """Return the record's pHash as a signed 64-bit integer, the range Beam's integer coder takes."""
    code = int(record["phash"])
    return code - (1 << 64) if code >= 1 << 63 else code


def _node_phash(node: str) -> int:
    return int(node_extra(node), 16)


class _BandChunks(beam.DoFn):
    """Cut a batch of distinct pHash codes into (band, part) chunks of the scheme picked for ``count`` codes.

    Each output element carries numpy arrays of codes and band values, so the shuffle moves
    12 bytes per code and band instead of one Python element each.
    """

    def __init__(self, radius: int, candidates: str, sampled_bits: int | None):
        self.radius = radius
        self.candidates = candidates
        self.sampled_bits = sampled_bits
        self._schemes: dict[int, ph.BandScheme] = {}

    def scheme_for(self, count: int) -> ph.BandScheme:
        scheme = self._schemes.get(count)
        if scheme is None:
            scheme = ph.make_scheme(self.radius, self.candidates, count=count, bits=self.sampled_bits)
            self._schemes[count] = scheme
            logger.info("near-duplicate images: %d distinct pHash codes, %s scheme with %d bands of %d-%d bits, "
                        "%d parts per band", count, "pigeonhole" if scheme.exact else "sampled", len(scheme.bands),
                        min(map(len, scheme.bands)), max(map(len, scheme.bands)), ph.band_parts(count))
        return scheme

    def process(self, batch: list[int], count: int):
        # The codes arrive as signed 64-bit integers (see ``_signed_code``).
        codes = np.asarray(batch, dtype=np.int64).view(np.uint64)
        for band, part, chunk_codes, chunk_values in ph.band_chunks(self.scheme_for(count), codes, ph.band_parts(count)):
            yield (band, part), (chunk_codes, chunk_values)


def _group_edges(item, radius: int):
    _, chunks = item
    codes, values = zip(*chunks)
    low, root = ph.group_code_edges(np.concatenate(codes), np.concatenate(values), radius)
    yield from zip(low.view(np.int64).tolist(), root.view(np.int64).tolist())


def _node_components(item):
    """Yield (component, node) for each node whose code has a near or equal code elsewhere.

    ``item`` is (code, {"node": nodes with that code, "label": the code's component label if
    it is not the smallest code of its component, "root": present if it is a label}).
    """
    code, grouped = item
    labels = list(grouped["label"])
    nodes = iter(grouped["node"])
    first = next(nodes, None)
    if first is None:
        return
    second = next(nodes, None)
    if labels:
        component = labels[0]
    elif second is not None or any(True for _ in grouped["root"]):
        component = code
    else:
        return
    yield component, first
    if second is not None:
        yield component, second
    for node in nodes:
        yield component, node


def _node_labels(item):
    """Yield (node, kept node) for every node of a component except the kept one."""
    _, grouped = item
    representative = min(grouped["kept"])
    for node in grouped["node"]:
        if node != representative:
            yield node, representative


class _ApplyLabels(RejectingDoFn):
    """Join each record with its cluster label; reject it when the label is another node."""

    def __init__(self, stage: str, reason: str, describe):
        self.stage = stage
        self.reason = reason
        self.describe = describe

    def process(self, item):
        node, grouped = item
        labels = list(grouped["label"])
        for record in grouped["record"]:
            self._in.inc()
            if labels:
                yield self._reject(record, self.reason, self.describe(node, labels))
            else:
                self._out.inc()
                yield record


def _describe_near_image(node: str, labels: list[str]) -> str:
    kept = labels[0]
    distance = ph.hamming(_node_phash(node), _node_phash(kept))
    return f"near duplicate of kept key {node_key(kept)} (pHash Hamming distance {distance})"


class DedupNearImages(beam.PTransform):
    """Cluster pHash codes within ``radius`` bits across the run; keep one sample per cluster.

    The search runs on distinct codes. Band groups receive numpy chunks of codes, verify the
    codes that share a band value (``ph.group_code_edges``) and send a star forest downstream;
    ``ConnectedComponents`` joins the forests into clusters of codes. Each record then learns
    its code's cluster, and the smallest node id of the cluster (the representative rule) is
    kept. Clusters are connected components, so a chain of close pairs joins samples whose own
    distance exceeds ``radius``, and records with equal codes always share a cluster. The
    reject detail gives the distance to the kept sample, which may exceed the radius.

    The band scheme depends on the number of distinct codes (``ph.make_scheme``), which a
    global count passes to the band step as a side input, so every worker builds the same
    bands. ``candidates="pigeonhole"`` is exact at any size.
    """

    def __init__(self, radius: int = DEFAULT_RADIUS, candidates: str = "auto", sampled_bits: int | None = None,
                 rounds: int = DEFAULT_ROUNDS):
        super().__init__()
        # Check the scheme name and bits now, so a bad value fails while the pipeline is built.
        ph.make_scheme(radius, candidates, count=1, bits=sampled_bits)
        self.candidates = candidates
        self.sampled_bits = sampled_bits
        self.radius = radius
        self.rounds = rounds

    def expand(self, records):
        with_hash = records | "HasPhash" >> beam.Partition(lambda r, _: 0 if r.get("phash") is not None else 1, 2)
        radius = self.radius
        nodes = with_hash[0] | "NodeByCode" >> beam.Map(lambda r: (_signed_code(r), _image_node(r)))

        # Band groups see each distinct code once, in numpy chunks. The count picks the scheme.
        codes = nodes | "Codes" >> beam.Keys() | "DistinctCodes" >> beam.Distinct()
        count = codes | "CountCodes" >> beam.combiners.Count.Globally()
        code_edges = (
            codes
            | "BatchCodes" >> beam.BatchElements(min_batch_size=256, max_batch_size=CODE_BATCH)
            | "BandChunks" >> beam.ParDo(_BandChunks(radius, self.candidates, self.sampled_bits),
                                         count=beam.pvalue.AsSingleton(count))
            | "GroupBands" >> beam.GroupByKey()
            | "VerifyGroups" >> beam.FlatMap(_group_edges, radius=radius)
        )
        code_labels = code_edges | "Components" >> ConnectedComponents(self.rounds)

        # Each clustered node gets its component, and a combiner finds the smallest node of each
        # component (the representative rule), so no worker keeps a whole cluster in memory.
        roots = (
            code_labels
            | "RootCodes" >> beam.Values()
            | "DistinctRoots" >> beam.Distinct()
            | "Roots" >> beam.Map(lambda code: (code, True))
        )
        components = (
            {"node": nodes, "label": code_labels, "root": roots}
            | "JoinCodes" >> beam.CoGroupByKey()
            | "NodeComponents" >> beam.FlatMap(_node_components)
        )
        representatives = components | "KeptNode" >> beam.CombinePerKey(min)
        labels = (
            {"node": components, "kept": representatives}
            | "JoinKept" >> beam.CoGroupByKey()
            | "NodeLabels" >> beam.FlatMap(_node_labels)
        )

        by_node = with_hash[0] | "ByNode" >> beam.Map(lambda r: (_image_node(r), r))
        joined = {"record": by_node, "label": labels} | "JoinLabels" >> beam.CoGroupByKey()
        out = split_rejects(
            joined,
            "ApplyLabels",
            _ApplyLabels(STAGE_NEAR_IMAGE, Reason.NEAR_DUPLICATE_IMAGE.value, _describe_near_image),
        )
        records_out = (out.records, with_hash[1]) | "WithUnhashed" >> beam.Flatten()
        return StageOutput(records_out, out.rejects)


# ---------------------------------------------------------------- captions


def _caption_nodes(record: dict[str, Any], config: caption_keys.NearConfig):
    """Yield (language, node, exact key, band keys, shingles) for each caption of a record."""
    base = node_id(record)
    for language in caption_keys.LANGUAGES:
        text = record.get(f"caption_{language}")
        key = caption_keys.exact_key(text)
        if not key:
            continue
        shingle_set = caption_keys.shingles(text, language, config)
        bands = caption_keys.lsh_band_keys(caption_keys.minhash(shingle_set, config), config)
        yield language, f"{language}{base}", key, bands, shingle_set


class _CaptionKeys(beam.DoFn):
    def __init__(self, config: caption_keys.NearConfig):
        self.config = config

    def process(self, record: dict[str, Any]):
        for language, node, key, bands, shingle_set in _caption_nodes(record, self.config):
            yield beam.pvalue.TaggedOutput("exact", ((language, key), node))
            for band in bands:
                yield (language, band), (node, key, sorted(shingle_set))


def _exact_edges(item):
    _, nodes = item
    first = None
    for node in nodes:
        if first is None:
            first = node
        else:
            yield node, first


def _near_edges(item, threshold: float):
    _, members = item
    distinct: dict[str, tuple[str, frozenset[str]]] = {}
    for node, key, shingle_list in members:
        # Exact-key duplicates are already linked by the exact step.
        distinct.setdefault(key, (node, frozenset(shingle_list)))
    if len(distinct) > 1:
        yield from caption_keys.near_duplicate_forest(list(distinct.values()), threshold)


def _caption_record_node(record: dict[str, Any]) -> str:
    return node_id(record)


def _split_language(label_item):
    node, label = label_item
    # Caption nodes are "zh<node id>" / "en<node id>"; the label is in the same language.
    return node[2:], (node[:2], label[2:])


class _ApplyCaptionLabels(RejectingDoFn):
    """Reject a record only when every caption it has duplicates a caption kept on another record."""

    stage = STAGE_CAPTION

    def process(self, item):
        _, grouped = item
        duplicated = dict(grouped["label"])
        for record in grouped["record"]:
            self._in.inc()
            languages = [lang for lang in caption_keys.LANGUAGES if caption_keys.exact_key(record.get(f"caption_{lang}"))]
            if languages and all(lang in duplicated for lang in languages):
                detail = "; ".join(
                    f"caption_{lang} duplicates kept key {node_key(duplicated[lang])}" for lang in languages
                )
                yield self._reject(record, Reason.DUPLICATE_CAPTION.value, detail)
            else:
                self._out.inc()
                yield record


class DedupCaptions(beam.PTransform):
    """Cluster equal and near-equal captions per language; reject records left with no own caption.

    Exact: records whose captions share ``exact_key``. Near: MinHash LSH over character
    n-grams (zh) or word n-grams (en), verified by Jaccard similarity of the shingle sets.
    Each language forms its own clusters and keeps one record per cluster by the
    representative rule. A record is rejected as duplicate_caption only when each of its
    captions sits in a cluster kept by another record: a record with a duplicated Chinese
    caption but its own English caption stays, with both captions.

    Same image + same caption never reaches this step as two records, because the sha256 or
    near-duplicate image step already kept one of them. Different images + same caption is
    what this step removes: a caption repeated over many images (stock text, template alt
    text, "a dog runs through the grass") then trains on one image only.
    """

    def __init__(self, threshold: float = 0.9, rounds: int = DEFAULT_ROUNDS, near: bool = True):
        super().__init__()
        self.config = caption_keys.NearConfig(threshold=threshold)
        self.rounds = rounds
        self.near = near

    def expand(self, records):
        keyed = records | "CaptionKeys" >> beam.ParDo(_CaptionKeys(self.config)).with_outputs("exact", main="bands")
        exact = keyed.exact | "GroupExact" >> beam.GroupByKey() | "ExactEdges" >> beam.FlatMap(_exact_edges)
        edge_sets = [exact]
        if self.near:
            near = (
                keyed.bands
                | "GroupBands" >> beam.GroupByKey()
                | "NearEdges" >> beam.FlatMap(_near_edges, threshold=self.config.threshold)
            )
            edge_sets.append(near)
        labels = (
            edge_sets
            | "AllEdges" >> beam.Flatten()
            | "Components" >> ConnectedComponents(self.rounds)
            | "ByRecord" >> beam.Map(_split_language)
        )
        by_node = records | "ByNode" >> beam.Map(lambda r: (_caption_record_node(r), r))
        joined = {"record": by_node, "label": labels} | "JoinLabels" >> beam.CoGroupByKey()
        return split_rejects(joined, "ApplyLabels", _ApplyCaptionLabels())


# ---------------------------------------------------------------- eval-set decontamination


class _Decontaminate(RejectingDoFn):
    stage = STAGE_EVAL

    def __init__(self, index: EvalIndex, radius: int):
        self.phashes = np.asarray(index.phashes, dtype=np.uint64)
        self.image_ids = list(index.image_ids)
        self.captions = dict(index.captions)
        self.radius = radius

    def process(self, record: dict[str, Any]):
        self._in.inc()
        code = record.get("phash")
        if code is not None and len(self.phashes):
            distances = np.bitwise_count(self.phashes ^ np.uint64(int(code)))
            nearest = int(np.argmin(distances))
            if distances[nearest] <= self.radius:
                detail = f"image within pHash Hamming distance {int(distances[nearest])} of eval image {self.image_ids[nearest]}"
                yield self._reject(record, Reason.EVAL_CONTAMINATION.value, detail)
                return
        for language in caption_keys.LANGUAGES:
            key = caption_keys.exact_key(record.get(f"caption_{language}"))
            eval_id = self.captions.get(key) if key else None
            if eval_id is not None:
                detail = f"caption_{language} equals a caption of eval item {eval_id}"
                yield self._reject(record, Reason.EVAL_CONTAMINATION.value, detail)
                return
        self._out.inc()
        yield record


class Decontaminate(beam.PTransform):
    """Reject records whose image is within ``radius`` of an eval image or whose caption equals an eval caption.

    The evaluation pHashes and caption keys ship inside the DoFn. Each record costs one numpy
    popcount over all evaluation pHashes and one dict lookup per caption.
    """

    def __init__(self, index: EvalIndex, radius: int = DEFAULT_RADIUS):
        super().__init__()
        self.dofn = _Decontaminate(index, radius)

    def expand(self, records):
        return split_rejects(records, "Check", self.dofn)


# ---------------------------------------------------------------- all steps


def dedup_steps(config: DedupConfig) -> list[str]:
    """Return the stage names ``apply_dedup_steps`` runs for this configuration, in order."""
    names = []
    if config.eval_sets:
        names.append(STAGE_EVAL)
    if config.near_images:
        names.append(STAGE_NEAR_IMAGE)
    if config.captions:
        names.append(STAGE_CAPTION)
    return names


def apply_dedup_steps(records, config: DedupConfig, eval_index: EvalIndex | None = None, prefix: str = ""):
    """Apply decontamination (with eval sets), near-duplicate image and caption dedup to ``records``.

    ``eval_index`` defaults to loading ``config.eval_sets`` here, when the pipeline is built.
    Returns the remaining records and the list of rejects PCollections, one per step run.
    """
    rejects = []
    steps = dedup_steps(config)
    if STAGE_EVAL in steps:
        if eval_index is None:
            eval_index = load_eval_sets(list(config.eval_sets))
        if not len(eval_index):
            raise ValueError(f"evaluation sets {list(config.eval_sets)} contain no readable images or captions")
        out = records | f"{prefix}Decontaminate" >> Decontaminate(eval_index, config.radius)
        records = out.records
        rejects.append(out.rejects)
    if STAGE_NEAR_IMAGE in steps:
        out = records | f"{prefix}DedupNearImage" >> DedupNearImages(
            config.radius, config.candidates, config.sampled_bits, config.components_rounds
        )
        records = out.records
        rejects.append(out.rejects)
    if STAGE_CAPTION in steps:
        out = records | f"{prefix}DedupCaption" >> DedupCaptions(
            config.caption_threshold, config.components_rounds, config.caption_near
        )
        records = out.records
        rejects.append(out.rejects)
    return records, rejects
