"""`make eval` section: cold-start items and the text-aware SASRec (issue 5).

A seeded 10% of the items is held out of training entirely (`model.data.cold_start_split`:
removed from every training sequence). Cases are split by their target: "cold" (a held-out
item) and "warm" (any other). Every model is scored by the one evaluation (full ranking, the
history masked, pessimistic ties) on both, plus the text-aware and ID-only SASRec trained on
the standard split under the same budget ("overall", the warm check against issue 4's model).

    python -m benchmarks.eval --sections cold [--quick]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.baselines import Popularity, TextKNN, TextKNNConfig
from model.config import SASRecConfig, TrainConfig
from model.data import SequenceDataset, Split, by_target, cold_start_split, train_sequences
from model.evaluate import (
    ScoreFn,
    case_ranks,
    evaluate_model,
    evaluate_scores_fn,
    paired_bootstrap,
    torch_score_fn,
)
from model.sasrec import TextSASRec
from model.text import TEXT_DIM, TEXT_ENCODER, TEXT_FORMAT, text_table
from model.train import CKPT_NAME, load_checkpoint, model_from_checkpoint, train

logger = logging.getLogger(__name__)

SPLITS: tuple[Split, Split] = ("valid", "test")
# The text-aware model's novelty boost (SASRecConfig.novelty_boost) is picked on validation:
# the best cold NDCG@10 among the boosts whose warm HR@10 and NDCG@10 stay within
# BOOST_WARM_COST (relative) of the same model without a boost.
BOOSTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
BOOST_WARM_COST = 0.01
TEXT_KNN_GRID = [{"session": s, "decay": d} for s in (1, 5, 20) for d in (0.7, 1.0)]
TEXT = {"text_dim": TEXT_DIM, "text_encoder": TEXT_ENCODER, "text_format": TEXT_FORMAT}


@dataclass(frozen=True)
class ColdPlan:
    """One cold-start run: the data, the shared SASRec settings, the text variant's settings."""

    file: str  # under --data-root; "" = the synthetic data set
    kind: str
    model: dict[str, Any]  # SASRecConfig fields shared by both SASRec variants
    text: list[dict[str, Any]]  # text-aware variants: what each adds (text_combine, id_dropout)
    train: dict[str, Any]  # TrainConfig fields, the same budget for every SASRec run
    fraction: float = 0.1
    seed: int = 0
    overall: bool = True  # also train both variants on the standard split (warm check)
    # Further split seeds (other held-out items): ID only and the first text variant, no warm
    # check; the text variant against text-kNN is then pooled over every seed's cold cases.
    more_seeds: tuple[int, ...] = ()


# Issue 4's recipe on a budget of a few minutes: a fixed number of epochs (not a time budget),
# so a busy box cannot give one variant more training than the other; max_seconds only caps it.
BUDGET = {
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "windows": "all",
    "patience": 1000,
    "epochs": 12,  # ~37 s each on one core at max_len 50; 5 hid most of the warm cost
    "lr": 6e-3,
    "max_seconds": 3000.0,
}


def unseen_head(id_dropout: float, epochs: int, features: bool = False) -> dict[str, Any]:
    """Known items exactly as the ID-only SASRec (frozen, reused), items without a trained ID
    as their text through a head fitted on it with ID dropout on the softmax side
    (`text_combine` "unseen"): no warm cost on known items by construction (BENCHMARKS.md).
    `features`: the head also reads the year and genres parsed from the text (item_features)
    and learns a score bias from them (text_bias)."""
    extra = {"item_features": True, "text_bias": True} if features else {}
    return {
        "text_combine": "unseen",
        "head_on_id": True,
        "head": {
            "model": {"id_dropout": id_dropout, "id_dropout_side": "output", **extra},
            "train": {
                "epochs": epochs,
                "warmup_epochs": 0.5,
                "trainable": "text_proj,unknown" + (",text_bias" if features else ""),
            },
        },
    }


def two_stage(id_dropout: float, epochs: int) -> dict[str, Any]:
    """A text variant trained without ID dropout (known items as good as ID only), then a cold
    head (its own text projection, `unknown`, `unknown_scale`) fitted on it, frozen, with ID
    dropout on the softmax side: the best warm/cold trade of the dev runs (BENCHMARKS.md)."""
    return {
        "text_combine": "sum",
        "id_dropout": 0.0,
        "head": {
            "model": {"cold_proj": True, "id_dropout": id_dropout, "id_dropout_side": "output"},
            "train": {"epochs": epochs, "warmup_epochs": 0.5, "trainable": "cold_proj,unknown"},
        },
    }


FULL = ColdPlan(
    "sasrec/ml-1m.txt",
    "ml-1m",
    # Issue 4's recipe: max_len 50 (ahead of 200 on warm validation by 10 %, and on cold
    # validation NDCG@10: results/eval_cold_maxlen200.json), post-LN and dropout 0.1 (ahead of
    # pre-LN / 0.2 on cold and warm validation at these 12 epochs: results/eval_cold_preln.json).
    {"max_len": 50, "d_model": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.1, "norm": "post"},
    # The dev runs' best validation trade (BENCHMARKS.md): the two-stage text model (official
    # run at b8a833b) costs known items 2.5 % on the standard split; this costs them nothing.
    # With the year and genres of the text as features and a text bias, the head's cold
    # validation NDCG@10 at the same warm cost rose by 40 % (split seed 0) and 88 % (seed 2)
    # in dev runs (BENCHMARKS.md); the head without them stays beside it on the first seed.
    # ID dropout 0.5 instead of 0.2 for that head: ahead of text-kNN on pooled validation over
    # the five seeds by +0.0111 HR@10 / +0.0027 NDCG@10, against +0.0028 / -0.0039 (dev run).
    [unseen_head(0.5, epochs=4, features=True), unseen_head(0.2, epochs=4)],
    BUDGET,
    more_seeds=(1, 2, 3, 4),  # one split's ~650 cold cases could not tell it from text-kNN
)
QUICK = ColdPlan(
    "",
    "synthetic",
    {"max_len": 50, "d_model": 32, "dropout": 0.2},
    [
        {"text_combine": "sum", "id_dropout": 0.5},
        two_stage(0.5, epochs=1),
        unseen_head(0.2, 1, features=True),
    ],
    {"epochs": 3, "lr": 3e-3, "max_seconds": 60.0},
    overall=False,
    more_seeds=(1,),
)


def subsets(ds: SequenceDataset, held: np.ndarray) -> dict[str, dict[str, SequenceDataset]]:
    """{"cold"|"warm": {split: the users whose split target is (not) held out}}."""
    return {
        "cold": {s: by_target(ds, s, held) for s in SPLITS},
        "warm": {s: by_target(ds, s, held, inside=False) for s in SPLITS},
    }


def score_subsets(
    score: Any, parts: dict[str, dict[str, SequenceDataset]], max_len: int
) -> dict[str, Any]:
    return {
        group: {s: evaluate_scores_fn(score, d, s, max_len) for s, d in by_split.items()}
        for group, by_split in parts.items()
    }


def among(score: ScoreFn, held: np.ndarray, num_items: int) -> ScoreFn:
    """score restricted to the held-out items (the others never outrank the target): how well
    a model orders the new items among themselves, whatever it thinks of the known ones."""
    known = np.ones(num_items + 1, dtype=bool)
    known[held] = False

    def restricted(windows: np.ndarray) -> np.ndarray:
        scores = np.array(score(windows), dtype=np.float32)  # (B, N + 1), a copy
        scores[:, known] = -np.inf
        return scores

    return restricted


def chance(parts: dict[str, dict[str, SequenceDataset]], k: int = 10) -> float:
    """HR@k of a uniformly random ranking on the cold test cases (k over the unmasked items)."""
    ds = parts["cold"]["test"]
    n = ds.num_items
    rates = [k / max(n - len(set(s[:-1].tolist()) - {s[-1]}), k) for s in ds.sequences]
    return float(np.mean(rates)) if rates else 0.0


def run_sasrec(
    name: str,
    ds: SequenceDataset,
    model: dict[str, Any],
    train_cfg: dict[str, Any],
    work: Path,
    threads: int,
) -> tuple[Any, dict[str, Any]]:
    """Train one variant; (best model, row without metrics)."""
    started = time.monotonic()
    cfg = SASRecConfig(num_items=ds.num_items, **model)
    path = train(ds, cfg, TrainConfig(threads=threads, **train_cfg), work, progress=False)
    ckpt = load_checkpoint(path)
    net = model_from_checkpoint(ckpt)
    params = sum(p.numel() for p in net.parameters())
    return net, {
        "model": name,
        "config": {**cfg.to_dict(), **ckpt["train_config"]},
        "best_epoch": ckpt["epoch"],
        "train_seconds": ckpt["metrics"]["total_train_seconds"],
        "wall_seconds": time.monotonic() - started,
        "parameters": params,
        "history": ckpt["metrics"]["history"],
        "checkpoint": str(path),
    }


# {model name: {split: (the model's case ranks, text-kNN's)}}: what a split run leaves for pooling
Pairs = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def run_cold(ds: SequenceDataset, plan: ColdPlan, work: Path, threads: int) -> dict[str, Any]:
    """plan.seed's split with every variant (and the warm check), then each of plan.more_seeds
    with ID only and the first text variant; that variant minus text-kNN, pooled over seeds."""
    texts = text_table(ds)
    pairs: list[Pairs] = []
    out = run_split(ds, plan, plan.seed, variants(plan), work, threads, texts, pairs)
    if plan.more_seeds:
        first = dict(list(variants(plan).items())[:2])  # ID only, the first text variant
        lighter = replace(plan, overall=False)
        seeds = [seed_summary(out, plan.seed)]
        for seed in plan.more_seeds:
            res = run_split(ds, lighter, seed, first, work / f"seed{seed}", threads, texts, pairs)
            seeds.append(seed_summary(res, seed))
        out["seeds"] = {"per_seed": seeds, "pooled": pool(pairs, list(first)[1])}
    return out


def run_split(
    ds: SequenceDataset,
    plan: ColdPlan,
    seed: int,
    chosen: dict[str, dict[str, Any]],
    work: Path,
    threads: int,
    texts: np.ndarray,
    pairs: list[Pairs],
) -> dict[str, Any]:
    """Every baseline and the `chosen` SASRec variants on the cold split of `seed`; appends the
    text variants' and text-kNN's case ranks on the cold cases to `pairs`."""
    cold_ds, held = cold_start_split(ds, plan.fraction, seed)
    parts = subsets(cold_ds, held)
    rows: list[dict[str, Any]] = []
    pop = Popularity(train_sequences(cold_ds), ds.num_items)
    rows.append({"model": "popularity", **score_subsets(pop.score_fn, parts, 1)})
    rows.append(text_knn(texts, parts))
    knn = _knn_fn(texts, rows[1])
    for row, (fn, max_len) in zip(rows, [(pop.score_fn, 1), knn], strict=True):
        row["cold_among_held_out"] = _among(fn, held, parts, max_len)
    ranks: Pairs = {}
    for name, extra in chosen.items():
        rows.append(run_variant(name, extra, ds, cold_ds, held, plan, work, threads, knn, ranks))
    pairs.append(ranks)
    return {
        "description": cold_ds.description,
        "held_out_items": len(held),
        "cases": {g: {s: len(d.sequences) for s, d in p.items()} for g, p in parts.items()},
        "chance_hr@10": chance(parts),
        "rows": rows,
    }


def seed_summary(result: dict[str, Any], seed: int) -> dict[str, Any]:
    """One split's headline numbers: each row's HR@10 / NDCG@10 on cold and warm cases."""
    rows = []
    for r in result["rows"]:
        row = {"model": r["model"]}
        row.update({g: {s: _headline(m) for s, m in r[g].items()} for g in ("cold", "warm")})
        for key in ("boost_value", "vs_text_knn"):
            if key in r:
                row[key] = r[key]
        rows.append(row)
    return {"seed": seed, "held_out_items": result["held_out_items"], "cases": result["cases"],
            "rows": rows}  # fmt: skip


def pool(pairs: list[Pairs], name: str) -> dict[str, Any]:
    """`name` minus text-kNN on the cold cases of every split run, pooled (paired bootstrap over
    all of them; a user can be a cold case under several seeds, with different held-out items)."""
    runs = [p[name] for p in pairs if name in p]
    joined = {
        split: tuple(np.concatenate([r[split][i] for r in runs]) for i in (0, 1))
        for split in SPLITS
    }
    return {"model": name, "seeds": len(runs), "vs_text_knn": _bootstrap(joined)}


def _among(
    fn: ScoreFn, held: np.ndarray, parts: dict[str, dict[str, SequenceDataset]], max_len: int
) -> dict[str, Any]:
    ds = parts["cold"]["test"]
    return {"test": evaluate_scores_fn(among(fn, held, ds.num_items), ds, "test", max_len)}


def _knn_fn(texts: np.ndarray, row: dict[str, Any]) -> tuple[ScoreFn, int]:
    knn = TextKNN(texts, TextKNNConfig(**row["config"]))
    return knn.score_fn, knn.max_len


def variants(plan: ColdPlan) -> dict[str, dict[str, Any]]:
    """SASRec variants by name: ID only, then each text-aware one (what it adds to plan.model)."""
    out: dict[str, dict[str, Any]] = {"SASRec (ID only)": {}}
    for extra in plan.text:
        out[f"SASRec + text ({', '.join(_describe(extra))})"] = {**TEXT, **extra}
    return out


def _describe(extra: dict[str, Any]) -> list[str]:
    """What a text variant changes, in words: ["ID dropout 0.2", "text-only loss 0.5"]."""
    head = extra.get("head", {}).get("model", {})
    if extra.get("head_on_id"):
        what = " with year, genres and a text bias" if head.get("item_features") else ""
        return [
            f"ID-only model frozen + text head{what} for unseen items (ID dropout "
            f"{head['id_dropout']})"
        ]
    words = []
    if extra.get("id_dropout"):
        side = " (softmax only)" if extra.get("id_dropout_side") == "output" else ""
        words.append(f"ID dropout {extra['id_dropout']}{side}")
    if extra.get("text_only_loss"):
        words.append(f"text-only loss {extra['text_only_loss']}")
    words = words or ["no ID dropout"]
    if head:
        side = ", softmax only" if head.get("id_dropout_side") == "output" else ""
        words.append(f"+ cold head (ID dropout {head['id_dropout']}{side})")
    return words


def _tag(extra: dict[str, Any]) -> str:
    """A run directory name for a variant: "id", "text-d0.2", "text-d0-t0.5"."""
    if not extra:
        return "id"
    if extra.get("head_on_id"):
        head = extra["head"]["model"]
        return f"text-unseen-d{head['id_dropout']}" + ("-feat" if head.get("item_features") else "")
    tag = f"text-d{extra.get('id_dropout', 0)}"
    if extra.get("id_dropout_side") == "output":
        tag += "o"
    tag += f"-t{extra['text_only_loss']}" if extra.get("text_only_loss") else ""
    return tag + ("-2stage" if "head" in extra else "")


HEAD_KEYS = ("config", "best_epoch", "train_seconds", "history")


def train_variant(
    name: str,
    ds: SequenceDataset,
    extra: dict[str, Any],
    plan: ColdPlan,
    work: Path,
    threads: int,
) -> tuple[Any, dict[str, Any]]:
    """Train one variant: plan.model + extra, then, when extra has a "head" (two-stage), fit
    that head on the frozen first-stage model (TrainConfig init_from + trainable). With
    "head_on_id" the first stage is the ID-only run of the same split (work's sibling
    "<split>-id", trained before every text variant), reused rather than trained again."""
    first = {k: v for k, v in extra.items() if k not in ("head", "head_on_id")}
    head = extra.get("head")

    def fit_head(base: Path) -> tuple[Any, dict[str, Any]]:
        assert head is not None
        model = {**plan.model, **first, **head["model"]}
        train_cfg = {**plan.train, **head["train"], "init_from": str(base / CKPT_NAME)}
        return run_sasrec(name, ds, model, train_cfg, work.with_name(work.name + "-head"), threads)

    if extra.get("head_on_id"):
        net, row = fit_head(work.with_name(work.name.split("-", 1)[0] + "-id"))
        return net, {**row, "head_on": "SASRec (ID only)", "head": {k: row[k] for k in HEAD_KEYS}}
    net, row = run_sasrec(name, ds, {**plan.model, **first}, plan.train, work, threads)
    if head is None:
        return net, row
    net, second = fit_head(work)
    row["head"] = {k: second[k] for k in HEAD_KEYS}
    row["train_seconds"] += second["train_seconds"]
    row["wall_seconds"] += second["wall_seconds"]
    return net, row


def run_variant(
    name: str,
    extra: dict[str, Any],
    ds: SequenceDataset,
    cold_ds: SequenceDataset,
    held: np.ndarray,
    plan: ColdPlan,
    work: Path,
    threads: int,
    against: tuple[ScoreFn, int] | None = None,
    ranks: Pairs | None = None,
) -> dict[str, Any]:
    """Train one SASRec variant on the cold split (and the standard split when plan.overall).
    A text variant is compared case by case with `against` (text-kNN's score fn, window) on the
    cold cases (`versus`); both models' case ranks go to `ranks[name]`."""
    parts = subsets(cold_ds, held)
    tag = _tag(extra)
    net, row = train_variant(name, cold_ds, extra, plan, work / f"cold-{tag}", threads)
    boost = 0.0
    if isinstance(net, TextSASRec):
        row["unboosted"] = {g: _model_metrics(net, p) for g, p in parts.items()}
        boost, row["boost"] = pick_boost(net, parts)
        row["boost_value"] = boost
        net.with_novelty_boost(boost)
    row.update({g: _model_metrics(net, p) for g, p in parts.items()})
    row["cold_among_held_out"] = _among(torch_score_fn(net), held, parts, net.cfg.max_len)
    if against is not None and isinstance(net, TextSASRec):
        pair = pair_ranks((torch_score_fn(net), net.cfg.max_len), against, parts["cold"])
        row["vs_text_knn"] = _bootstrap(pair)
        if ranks is not None:
            ranks[name] = pair
    if plan.overall:
        net, full = train_variant(name, ds, extra, plan, work / f"full-{tag}", threads)
        if isinstance(net, TextSASRec):  # the same boost: it moves only items without clicks
            net.with_novelty_boost(boost)
        row["overall"] = {s: evaluate_model(net, ds, s) for s in SPLITS}
        row["overall_run"] = {k: full[k] for k in ("best_epoch", "train_seconds")}
    return row


def versus(
    a: tuple[ScoreFn, int], b: tuple[ScoreFn, int], by_split: dict[str, SequenceDataset]
) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {metric: paired_bootstrap}}: model a minus model b (score fn, window) on the
    same cases, HR@10 and NDCG@10. Is "above text-kNN" more than the luck of 650 cases?"""
    return _bootstrap(pair_ranks(a, b, by_split))


def pair_ranks(
    a: tuple[ScoreFn, int], b: tuple[ScoreFn, int], by_split: dict[str, SequenceDataset]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (a's case ranks, b's)} on the same cases."""
    out = {}
    for split, ds in by_split.items():
        ra, rb = (case_ranks(fn, ds, split, max_len) for fn, max_len in (a, b))
        out[split] = (ra, rb)
    return out


def _bootstrap(
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, dict[str, dict[str, float]]]:
    return {
        split: {m: paired_bootstrap(ra, rb, metric=m) for m in ("hr@10", "ndcg@10")}
        for split, (ra, rb) in pairs.items()
    }


def pick_boost(
    net: TextSASRec,
    parts: dict[str, dict[str, SequenceDataset]],
    boosts: tuple[float, ...] = BOOSTS,
    cap: float = BOOST_WARM_COST,
) -> tuple[float, dict[str, Any]]:
    """(boost, record): the novelty boost chosen on the validation cases (see BOOSTS)."""
    tried = []
    for boost in boosts:
        net.with_novelty_boost(boost)
        metrics = {g: evaluate_model(net, parts[g]["valid"], "valid") for g in ("cold", "warm")}
        tried.append({"boost": boost, **{f"{g}_valid": _headline(m) for g, m in metrics.items()}})
    net.with_novelty_boost(0.0)
    return choose_boost(tried, cap), {"rule": BOOST_RULE, "cap": cap, "tried": tried}


BOOST_RULE = (
    "best cold valid ndcg@10 among boosts whose warm valid hr@10 and ndcg@10 are within cap "
    "(relative) of boost 0"
)


def choose_boost(tried: list[dict[str, Any]], cap: float) -> float:
    """BOOST_RULE over pick_boost's rows (one of them is boost 0)."""
    base = next(t for t in tried if t["boost"] == 0.0)["warm_valid"]
    allowed = [
        t for t in tried
        if all(t["warm_valid"][m] >= (1.0 - cap) * base[m] for m in ("hr@10", "ndcg@10"))
    ]  # fmt: skip
    best = max(allowed, key=lambda t: (t["cold_valid"]["ndcg@10"], -t["boost"]))
    return float(best["boost"])


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    return {m: metrics[m] for m in ("hr@10", "ndcg@10")}


def _model_metrics(net: Any, by_split: dict[str, SequenceDataset]) -> dict[str, Any]:
    return {s: evaluate_model(net, d, s) for s, d in by_split.items()}


def text_knn(texts: np.ndarray, parts: dict[str, dict[str, SequenceDataset]]) -> dict[str, Any]:
    """The text-kNN setting with the best cold validation NDCG@10, scored everywhere."""
    tried, best = [], None
    for params in TEXT_KNN_GRID:
        knn = TextKNN(texts, TextKNNConfig(**params))
        valid = evaluate_scores_fn(knn.score_fn, parts["cold"]["valid"], "valid", knn.max_len)
        tried.append({"config": params, "cold_valid_ndcg@10": valid["ndcg@10"]})
        if best is None or valid["ndcg@10"] > best[1]:
            best = (knn, valid["ndcg@10"])
    assert best is not None
    knn = best[0]
    return {
        "model": knn.name,
        "config": knn.config,
        "tried": tried,
        **score_subsets(knn.score_fn, parts, knn.max_len),
    }
