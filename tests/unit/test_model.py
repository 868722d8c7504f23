from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import SASRecConfig, TrainConfig
from model.data import load_dataset
from model.errors import ConfigError
from model.loss import full_softmax_ce
from model.sasrec import SASRec
from model.schedule import fit_epochs, lr_at
from model.train import load_checkpoint, sequence_loss, train
from tests.unit.test_data import chain_dataset_dir

torch.set_num_threads(2)
POSITIONS = ["first", "slot"]


def tiny(
    positions: str = "first", dropout: float = 0.0, seed: int = 0, norm: str = "pre"
) -> SASRec:
    torch.manual_seed(seed)
    cfg = SASRecConfig(
        num_items=20, max_len=8, d_model=16, n_blocks=2, n_heads=2, dropout=dropout,
        positions=positions, norm=norm,  # type: ignore[arg-type]
    )  # fmt: skip
    model = SASRec(cfg)
    if norm == "post":
        # At init (std 0.02) a post-LN block's output is almost its input's LayerNorm: earlier
        # items move the last output by ~1e-4. Sharper weights make them matter as in training.
        sharpen(model)
    return model.eval()


def sharpen(model: SASRec, factor: float = 10.0) -> SASRec:
    """Every weight but the LayerNorms' times `factor`, so attention is far from uniform and
    scores spread as a trained model's do."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" not in name:
                param.mul_(factor)
    return model


def left_padded(*rows: list[int], length: int = 8) -> torch.Tensor:
    return torch.tensor([[0] * (length - len(r)) + r for r in rows], dtype=torch.int64)


def test_shapes_and_tied_padding_row():
    model = tiny()
    seq = left_padded([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [20])
    assert model(seq).shape == (3, 8, 16)
    assert model.score_last(seq).shape == (3, 21)
    assert torch.count_nonzero(model.item_emb.weight[0]) == 0


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_changing_a_later_item_leaves_earlier_positions_unchanged(positions: str, norm: str):
    model = tiny(positions, norm=norm)
    a = left_padded([3, 4, 5, 6, 7, 8])
    b = a.clone()
    b[0, 5] = 19
    with torch.no_grad():
        ha, hb = model(a), model(b)
    assert torch.allclose(ha[:, :5], hb[:, :5], atol=1e-6)
    assert not torch.allclose(ha[:, 5:], hb[:, 5:], atol=1e-3)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_extra_left_padding_does_not_change_the_last_output(positions: str, norm: str):
    model = tiny(positions, norm=norm)
    with torch.no_grad():
        outputs = [model.score_last(left_padded([5, 9, 2], length=n)) for n in (3, 5, 8)]
        other_pad = model.score_last(left_padded([7, 9, 2], length=8))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(outputs[0], outputs[2], atol=1e-5)
    assert not torch.allclose(outputs[2], other_pad, atol=1e-3)  # real items do matter


def test_all_padding_rows_stay_finite_in_forward_and_backward():
    model = tiny(dropout=0.2).train()
    seq = left_padded([], [1, 2])
    hidden = model(seq)
    assert torch.isfinite(hidden).all()
    model.logits(hidden).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_loss_equals_cross_entropy_over_all_positions():
    model = tiny()
    inputs = left_padded([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11])
    targets = left_padded([2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12])
    logits = model.logits(model(inputs))  # (B, L, N + 1)
    expected = F.cross_entropy(logits.view(-1, 21), targets.view(-1), ignore_index=0)
    assert torch.allclose(sequence_loss(model, inputs, targets), expected, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [256, 7])  # one chunk; five, the last one short
def test_fused_loss_and_gradients_equal_cross_entropy(smoothing: float, chunk_rows: int):
    torch.manual_seed(0)
    hidden = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(21, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 21, (30,))
    fused = full_softmax_ce(hidden, weight, targets, smoothing, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(fused, (hidden, weight))
    plain = F.cross_entropy(hidden @ weight.T, targets, label_smoothing=smoothing)
    expected = torch.autograd.grad(plain, (hidden, weight))
    assert torch.allclose(fused, plain, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, expected, strict=True))


def test_fused_loss_under_no_grad_computes_only_the_value():
    torch.manual_seed(1)
    hidden, weight = torch.randn(9, 4), torch.randn(6, 4)
    targets = torch.randint(0, 6, (9,))
    with torch.no_grad():
        loss = full_softmax_ce(hidden, weight, targets, chunk_rows=4)
    assert torch.allclose(loss, F.cross_entropy(hidden @ weight.T, targets), atol=1e-6)
    assert loss.grad_fn is None


def test_future_targets_weigh_the_next_items_of_the_window():
    model = tiny()
    inputs = left_padded([1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    targets = left_padded([2, 3, 4, 5], [6, 7, 8, 9, 10, 11])
    log_p = F.log_softmax(model.logits(model(inputs)), dim=-1)  # (B, L, N + 1)
    per_position = []
    for b, p in (targets != 0).nonzero().tolist():
        ahead = [(0.5**j, targets[b, p + j]) for j in range(3) if p + j < 8]
        total = sum(w for w, _ in ahead)
        per_position.append(sum(-w * log_p[b, p, t] for w, t in ahead) / total)
    expected = torch.stack(per_position).mean()
    got = sequence_loss(model, inputs, targets, future=3, future_decay=0.5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(sequence_loss(model, inputs, targets, future=1), F.cross_entropy(
        log_p.view(-1, 21), targets.view(-1), ignore_index=0), atol=1e-5)  # fmt: skip


def test_learning_rate_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(epochs=10, lr=2e-3, schedule="cosine", warmup_epochs=2)
    assert lr_at(cfg, 1.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 2.0) == pytest.approx(2e-3)
    assert lr_at(cfg, 6.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(TrainConfig(lr=1e-3), 7.5) == 1e-3


def test_fit_epochs_cuts_the_horizon_to_the_measured_pace():
    cfg = TrainConfig(epochs=100, max_seconds=100, warmup_epochs=1, fit_epochs=True)
    fitted = fit_epochs(cfg, done=1, elapsed=10.0, deadline=time.monotonic() + 90.0)
    assert fitted.epochs == 9  # 1 done + 0.95 * 90 s / 10 s per epoch
    assert not fitted.fit_epochs and fitted.lr == cfg.lr
    roomy = fit_epochs(cfg, done=1, elapsed=0.1, deadline=time.monotonic() + 90.0)
    assert roomy.epochs == 100  # never more than asked
    late = fit_epochs(cfg, done=2, elapsed=200.0, deadline=time.monotonic() - 5.0)
    assert late.epochs == 2


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_overfits_one_small_batch(norm: str):
    model = tiny(dropout=0.1, norm=norm).train()
    inputs = left_padded([1, 2, 3, 4], [9, 8, 7], [5, 10, 15, 20, 3, 6])
    targets = left_padded([2, 3, 4, 5], [8, 7, 6], [10, 15, 20, 3, 6, 9])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = sequence_loss(model, inputs, targets)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 2.5  # about ln(21) at init
    assert loss.item() < 0.2 * first


def test_invalid_config_is_refused():
    with pytest.raises(ConfigError):
        SASRecConfig(num_items=10, d_model=10, n_heads=3)
    with pytest.raises(ConfigError):
        SASRecConfig(num_items=10, norm="sandwich")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TrainConfig(max_seconds=0)


def _train_tiny(data: Path, out: Path, epochs: int, resume: bool = False, **options) -> dict:
    ds = load_dataset(f"synthetic:{data}")
    model_cfg = SASRecConfig(num_items=ds.num_items, max_len=8, d_model=16, n_heads=2)
    train_cfg = TrainConfig(epochs=epochs, batch_size=8, lr=5e-3, seed=3, patience=50, **options)
    return load_checkpoint(train(ds, model_cfg, train_cfg, out, progress=False, resume=resume))


def _same_weights(a: dict, b: dict) -> bool:
    sa, sb = a["state_dict"], b["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_reproducible_and_resumable(tmp_path: Path):
    data = chain_dataset_dir(tmp_path / "data", num_items=40)
    a = _train_tiny(data, tmp_path / "a", epochs=3)
    b = _train_tiny(data, tmp_path / "b", epochs=3)
    assert _same_weights(a, b)
    assert {"valid", "test", "popularity_valid"} <= a["metrics"].keys()
    assert a["best_metric"] == a["metrics"]["valid"]["ndcg@10"]
    assert a["best_metric"] > a["metrics"]["popularity_valid"]["ndcg@10"]
    assert a["dataset"]["name"] == "synthetic" and a["item_ids"][0] == "m001"
    # One epoch, then resume to three: the same run as three epochs straight.
    first = _train_tiny(data, tmp_path / "c", epochs=1)
    assert first["epoch"] == 1
    resumed = _train_tiny(data, tmp_path / "c", epochs=3, resume=True)
    assert _same_weights(resumed, a)
    assert resumed["epoch"] == a["epoch"]


def test_every_window_cosine_and_smoothing_train_reproducibly_with_a_history(tmp_path: Path):
    data = chain_dataset_dir(tmp_path / "data", num_items=40, num_users=30)
    options = {"windows": "all", "schedule": "cosine", "warmup_epochs": 0.5}
    a = _train_tiny(data, tmp_path / "a", epochs=3, label_smoothing=0.1, **options)
    b = _train_tiny(data, tmp_path / "b", epochs=3, label_smoothing=0.1, **options)
    assert _same_weights(a, b)
    history = a["metrics"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all(row["loss"] > 0 and 0 <= row["valid_ndcg@10"] <= 1 for row in history)
    assert a["best_metric"] == max(row["valid_ndcg@10"] for row in history)
    assert 0 < a["metrics"]["train_seconds"] <= a["metrics"]["total_train_seconds"]


def test_init_from_and_trainable_fit_one_part_of_a_trained_model(tmp_path: Path):
    data = chain_dataset_dir(tmp_path / "data", num_items=40)
    base = _train_tiny(data, tmp_path / "base", epochs=2)
    path = tmp_path / "base" / "ckpt.pt"
    head = _train_tiny(data, tmp_path / "head", epochs=2, init_from=str(path), trainable="pos_emb")
    frozen = {k for k in base["state_dict"] if not k.startswith("pos_emb")}
    assert all(torch.equal(base["state_dict"][k], head["state_dict"][k]) for k in frozen)
    assert not torch.equal(
        base["state_dict"]["pos_emb.weight"], head["state_dict"]["pos_emb.weight"]
    )
    with pytest.raises(ConfigError, match="names no parameter"):
        _train_tiny(data, tmp_path / "bad", epochs=1, init_from=str(path), trainable="nope")


def test_the_fitted_horizon_counts_the_validation_every_epoch_pays(tmp_path: Path, monkeypatch):
    import model.train as train_module

    data = chain_dataset_dir(tmp_path / "data", num_items=40)
    validate, events = train_module._validate, []

    def logged_validate(*args, **kwargs):
        events.append("validate")
        return validate(*args, **kwargs)

    def logged_fit(*args, **kwargs):
        events.append("fit")
        return fit_epochs(*args, **kwargs)

    monkeypatch.setattr(train_module, "_validate", logged_validate)
    monkeypatch.setattr(train_module, "fit_epochs", logged_fit)
    _train_tiny(data, tmp_path / "m", epochs=3, max_seconds=600.0, fit_epochs=True)
    # The pace is measured after the first epoch's validation, so it includes one.
    assert events[:2] == ["validate", "fit"] and events.count("fit") == 1


def test_weight_decay_shrinks_matrices_and_leaves_biases_and_layer_norms_alone():
    from model.train import _optimizer

    model = tiny().train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = _optimizer(model, TrainConfig(lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1.0 - 0.1 * 0.5 if p.ndim >= 2 else 1.0  # AdamW: p -= lr * wd * p
        assert torch.allclose(p.detach(), before[name] * factor), name
