"""Text-aware SASRec (items = text projection + ID) and the time features."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from export.item_text import feature_dim, item_features
from model.config import SASRecConfig
from model.errors import ConfigError
from model.sasrec import SASRec, TextSASRec, TimeFeatures, build_model, log_bucket
from model.text import item_text

torch.set_num_threads(2)
N, T, D, L = 12, 6, 8, 6


def text_model(
    known: list[int] | None = None, combine: str = "sum", id_dropout: float = 0.0
) -> TextSASRec:
    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=N, max_len=L, d_model=D, n_blocks=2, n_heads=2, dropout=0.0, text_dim=T,
        text_combine=combine, id_dropout=id_dropout,  # type: ignore[arg-type]
    )  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model, TextSASRec)
    table = np.random.default_rng(0).normal(size=(N + 1, T)).astype(np.float32)
    model.set_text(table / np.linalg.norm(table, axis=1, keepdims=True))
    mask = np.zeros(N + 1, dtype=bool)
    mask[known if known is not None else range(1, N + 1)] = True
    model.set_known(mask)
    return model.eval()


def pad(*rows: list[int], length: int = L) -> torch.Tensor:
    return torch.tensor([[0] * (length - len(r)) + r for r in rows], dtype=torch.int64)


def test_text_model_shapes_and_zero_padding_row():
    model = text_model()
    seq = pad([1, 2, 3], [4, 5, 6, 7, 8, 9], [12])
    assert model(seq).shape == (3, L, D)
    assert model.score_last(seq).shape == (3, N + 1)
    vectors = model.item_vectors()
    assert vectors.shape == (N + 1, D)
    assert torch.count_nonzero(vectors[0]) == 0


@pytest.mark.parametrize("combine", ["sum", "gate"])
def test_text_model_is_causal_and_ignores_padding(combine: str):
    model = text_model(combine=combine)
    a = pad([3, 4, 5, 6, 7])
    b = a.clone()
    b[0, -1] = 11
    with torch.no_grad():
        ha, hb = model(a), model(b)
        shorter = model.score_last(pad([3, 4, 5], length=3))
        longer = model.score_last(pad([3, 4, 5]))
    assert torch.allclose(ha[:, :-1], hb[:, :-1], atol=1e-6)
    assert not torch.allclose(ha[:, -1], hb[:, -1], atol=1e-4)
    assert torch.allclose(shorter, longer, atol=1e-5)


@pytest.mark.parametrize("combine", ["sum", "gate"])
def test_unseen_items_are_their_text_projection_alone(combine: str):
    model = text_model(known=[1, 2, 3, 4, 5, 6, 7, 8], combine=combine)
    with torch.no_grad():
        model.unknown.normal_()  # the shared vector of items without a trained ID
        model.unknown_scale.fill_(1.7)  # and the learned scale of their text part
    extras = model.bundle_extras()
    w, b, emb = extras["text_proj_w"], extras["text_proj_b"], extras["item_text_emb"]
    assert w.shape == (T, D) and b.shape == (D,) and emb.shape == (N + 1, T)
    with torch.no_grad():
        before = model.item_vectors().numpy().copy()
        model.item_emb.weight[9:].normal_()  # the ID rows of the unseen items 9..12
        after = model.item_vectors().numpy()
    np.testing.assert_allclose(before, after)  # their ID embeddings play no part
    np.testing.assert_allclose(after[9:], emb[9:] @ w + b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[1:9], emb[1:9] @ w + b, atol=1e-4)  # known: text + ID


def test_id_dropout_acts_in_training_only():
    model = text_model(id_dropout=0.5)
    with torch.no_grad():
        first, second = model.item_vectors(), model.item_vectors()
        assert torch.equal(first, second)
        model.train()
        torch.manual_seed(1)
        dropped = model.item_vectors()
    text_only = model.text_proj(model.text_emb) * model.unknown_scale + model.unknown
    rows = [i for i in range(1, N + 1) if torch.allclose(dropped[i], text_only[i])]
    assert 0 < len(rows) < N  # some items lost their ID part, not all


def test_text_model_checkpoint_state_round_trip():
    model = text_model(known=[1, 2, 3])
    clone = build_model(model.cfg)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    seq = pad([1, 5, 9])
    with torch.no_grad():
        assert torch.equal(model.score_last(seq), clone.score_last(seq))


def test_default_config_builds_the_plain_id_only_model():
    torch.manual_seed(0)
    cfg = SASRecConfig(num_items=N, max_len=L, d_model=D)
    model = build_model(cfg)
    torch.manual_seed(0)
    plain = SASRec(cfg)
    assert type(model) is SASRec and model.time is None
    assert model.bundle_extras() == {}
    for (name, a), (other, b) in zip(
        model.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(a, b)
    assert not any("text" in k or "time" in k for k in model.state_dict())


def test_item_text_rule():
    assert item_text(" Toy Story (1995) ", "Animation|Children's|Comedy") == (
        "Toy Story (1995). Genres: Animation, Children's, Comedy"
    )
    assert item_text("Heat (1995)", "") == "Heat (1995)"


# -- time -------------------------------------------------------------------------------------
def test_log_buckets_against_hand_values():
    seconds = torch.tensor([0, 1, 2, 3, 30, 3600, 86_400, 31_536_000, 10**12])
    assert log_bucket(seconds, 28).tolist() == [0, 1, 1, 2, 4, 11, 16, 24, 27]
    assert log_bucket(seconds, 12).tolist() == [0, 1, 1, 2, 4, 11, 11, 11, 11]


def test_log_buckets_are_exact_at_every_power_of_two_in_torch_and_onnxruntime(tmp_path):
    """1 + seconds just below, at and above each 2^k: float log2 alone misses some of these
    (onnxruntime's ln(x) / ln(2) put 2^15 in bucket 14), the bucket rule must not."""
    import onnxruntime as ort

    from export.graphs import legacy_export

    seconds = torch.tensor(
        [(1 << k) - 1 + d for k in range(45) for d in (-1, 0, 1) if (1 << k) - 1 + d >= 0]
    )
    want = [min((s + 1).bit_length() - 1, 27) for s in seconds.tolist()]
    assert log_bucket(seconds, 28).tolist() == want

    class Buckets(torch.nn.Module):
        def forward(self, s: torch.Tensor) -> torch.Tensor:
            return log_bucket(s, 28)

    path = legacy_export(Buckets(), (seconds[:3],), tmp_path / "b.onnx", input_names=["s"],
                         output_names=["b"], dynamic_axes={"s": {0: "n"}}, opset=17)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"s": seconds.numpy()})[0].tolist() == want


def time_cfg(**kw: object) -> SASRecConfig:
    base: dict[str, object] = dict(
        num_items=N, max_len=L, d_model=D, n_heads=2, dropout=0.0, time_buckets=28
    )
    return SASRecConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_time_features_interval_buckets_and_session_starts():
    feats = TimeFeatures(time_cfg(session_gap_s=1800))
    items = torch.tensor([[0, 0, 5, 6, 7, 8]])
    times = torch.tensor([[0, 0, 1000, 1030, 4900, 4900]])
    has_prev, interval, starts = feats._starts(items, times)
    assert has_prev.tolist() == [[False, False, False, True, True, True]]
    assert interval[0, 3:].tolist() == [30, 3870, 0]
    assert starts.tolist() == [[True, True, True, False, True, False]]
    # interval bucket 0 = no previous click, else 1 + floor(log2(1 + gap))
    bucket = torch.where(has_prev, 1 + log_bucket(interval, 28), 0)
    assert bucket.tolist() == [[0, 0, 0, 5, 12, 1]]
    bias = feats.bias(items, times)
    assert bias.shape == (1, 2, L, L)


def test_time_model_is_causal_needs_times_and_ignores_padding():
    torch.manual_seed(0)
    model = SASRec(time_cfg()).eval()
    with torch.no_grad():  # a trained model's biases are not zero
        for p in model.time.parameters():  # type: ignore[union-attr]
            p.normal_()
    items = pad([3, 4, 5, 6, 7])
    times = pad([100, 200, 5000, 5010, 90_000])
    later = times.clone()
    later[0, -1] = 900_000
    with torch.no_grad():
        a, b = model(items, times), model(items, later)
        short = model.score_last(items[:, -3:], times[:, -3:])
        assert torch.allclose(model.score_last(pad([5, 6, 7]), pad([5000, 5010, 90_000])), short)
    assert torch.allclose(a[:, :-1], b[:, :-1], atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)
    with pytest.raises(ConfigError):
        model(items)


def test_novelty_boost_lifts_untrained_items_at_scoring_time_only():
    model = text_model(known=[1, 2, 3, 4, 5, 6, 7, 8])
    seq = pad([1, 5, 9])
    with torch.no_grad():
        plain = model.score_last(seq)
        boosted = model.with_novelty_boost(0.75).score_last(seq)
        assert model.cfg.novelty_boost == 0.75  # in the config: checkpoints and manifests
        np.testing.assert_allclose((boosted - plain)[0, 9:], 0.75, rtol=1e-5)
        np.testing.assert_allclose((boosted - plain)[0, :9], 0.0, atol=1e-6)  # padding, known
        assert model.train().score_bias() is None  # the training loss never sees it
    bias = model.eval().bundle_extras()["item_bias"]
    assert bias.dtype == np.float32 and bias.shape == (N + 1,)
    np.testing.assert_array_equal(bias, [0.0] * 9 + [0.75] * 4)
    assert "item_bias" not in model.with_novelty_boost(0.0).bundle_extras()


def test_novelty_boost_needs_a_text_model_and_a_finite_value():
    with pytest.raises(ConfigError, match="novelty_boost"):
        SASRecConfig(num_items=N, novelty_boost=0.5)
    with pytest.raises(ConfigError, match="novelty_boost"):
        SASRecConfig(num_items=N, text_dim=T, novelty_boost=float("nan"))


def test_the_step_pair_adds_the_novelty_boost_as_the_full_model_does():
    from export.graphs import parity_windows
    from export.step_export import STEP_RTOL, check_replay, torch_fns

    model = text_model(known=[1, 2, 3, 4, 5, 6, 7, 8]).with_novelty_boost(2.0)
    windows = parity_windows(N, L, 9, seed=0)
    full, prefill, step = torch_fns(model)
    assert check_replay(windows, full, prefill, step, from_empty=True) <= STEP_RTOL
    plain = torch_fns(text_model(known=[1, 2, 3, 4, 5, 6, 7, 8]))[2]
    past = np.zeros((1, 2, 2, 1, D), np.float16)
    item, position = np.array([3]), np.array([0])
    lift = step(item, position, past)[0] - plain(item, position, past)[0]
    np.testing.assert_allclose(lift[0], [0.0] * 9 + [2.0] * 4, atol=1e-5)


def test_output_side_id_dropout_keeps_the_input_windows_exact():
    model = text_model(id_dropout=0.5)
    model.cfg = replace(model.cfg, id_dropout_side="output")
    with torch.no_grad():
        exact = model.item_vectors()
        model.train()
        torch.manual_seed(1)
        inputs, outputs = model.input_vectors(), model.item_vectors()
    torch.testing.assert_close(inputs, exact)  # the Transformer reads every ID
    assert not torch.allclose(outputs, exact)  # the softmax still loses some


def test_text_only_loss_adds_a_softmax_over_every_items_text_alone():
    from model.loss import sequence_loss

    model = text_model()
    inputs, targets = pad([1, 2, 3, 4]), pad([2, 3, 4, 5])
    with torch.no_grad():
        plain = sequence_loss(model, inputs, targets)
    model.cfg = replace(model.cfg, text_only_loss=0.5)
    model.zero_grad()
    weighted = sequence_loss(model, inputs, targets)
    weighted.backward()
    assert weighted.item() > plain.item() + 0.1  # + 0.5 x a cross-entropy over 13 columns
    assert model.unknown_scale.grad is not None and float(model.unknown_scale.grad.abs()) > 0
    text_only = model.text_only_vectors()
    with torch.no_grad():
        expected = model.text_proj(model.text_emb) * model.unknown_scale + model.unknown
    torch.testing.assert_close(text_only[1:], expected[1:])


def test_a_cold_projection_moves_only_the_items_without_a_trained_id():
    torch.manual_seed(0)
    model = text_model(known=[1, 2, 3, 4, 5, 6, 7, 8])
    cold = build_model(replace(model.cfg, cold_proj=True))
    assert isinstance(cold, TextSASRec)
    cold.load_state_dict(model.state_dict(), strict=False)  # the same weights, a new head
    cold.eval()
    with torch.no_grad():
        before = cold.item_vectors().clone()
        cold.cold_proj.weight.normal_()
        after = cold.item_vectors()
    torch.testing.assert_close(after[:9], before[:9])  # known items and padding unchanged
    assert not torch.allclose(after[9:], before[9:])
    extras = cold.bundle_extras()  # a runtime item gets exactly an untrained item's row
    expected = extras["item_text_emb"][9:] @ extras["text_proj_w"] + extras["text_proj_b"]
    np.testing.assert_allclose(after[9:].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_unseen_combine_is_the_id_only_model_for_known_items():
    torch.manual_seed(0)
    base = SASRec(SASRecConfig(num_items=N, max_len=L, d_model=D, n_blocks=2, n_heads=2,
                               dropout=0.0))  # fmt: skip
    model = text_model(known=[1, 2, 3, 4, 5, 6, 7, 8], combine="unseen")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and {"text_proj.weight", "unknown"} <= set(missing)
    seq = pad([1, 5, 7])
    with torch.no_grad():
        vectors = model.item_vectors()
        torch.testing.assert_close(vectors[1:9], base.item_emb.weight[1:9])  # IDs alone
        known_scores = model.score_last(seq)[:, :9]
        torch.testing.assert_close(known_scores, base.eval().score_last(seq)[:, :9])
    extras = model.bundle_extras()  # unseen items: their text alone, as runtime items are
    expected = extras["item_text_emb"][9:] @ extras["text_proj_w"] + extras["text_proj_b"]
    np.testing.assert_allclose(vectors[9:].numpy(), expected, rtol=1e-5, atol=1e-5)


def featured_model(id_dropout: float = 0.0) -> TextSASRec:
    """Items 1-8 trained, 9-12 not; [text, item features] inputs, a text bias, a boost."""
    torch.manual_seed(0)
    genres = ("Action", "Drama")
    cfg = SASRecConfig(
        num_items=N, max_len=L, d_model=D, n_blocks=1, n_heads=1, dropout=0.0, text_dim=T,
        text_combine="unseen", item_features=True, feature_genres=genres, text_bias=True,
        novelty_boost=0.5, id_dropout=id_dropout, id_dropout_side="output",
    )  # fmt: skip
    model = build_model(cfg)
    assert isinstance(model, TextSASRec)
    texts = [item_text(f"Film {i} ({1940 + 5 * i})", "Action|Drama"[: 3 + i]) for i in range(N)]
    rng = np.random.default_rng(1)
    table = np.concatenate(
        [rng.normal(size=(N, T)), [item_features(t, genres) for t in texts]], axis=1
    )
    model.set_text(np.concatenate([np.zeros((1, T + feature_dim(genres))), table]))
    model.set_known(np.arange(N + 1) <= 8)
    assert model.text_bias is not None
    with torch.no_grad():
        model.text_bias.weight.normal_()
        model.text_bias.bias.fill_(0.3)
    return model


def test_text_bias_and_item_features_score_the_untrained_items_only():
    model = featured_model().eval()
    extras = model.bundle_extras()
    x = model.text_emb.numpy()  # (N + 1, T + F): embeddings, then the features
    assert extras["item_text_emb"].shape == (N + 1, T)  # the embeddings alone
    assert extras["text_proj_w"].shape == (x.shape[1], D)
    w = extras["text_bias"]
    expected = np.zeros(N + 1, np.float32)
    expected[9:] = 0.5 + x[9:] @ w[:-1] + w[-1]  # boost + the text bias
    with torch.no_grad():
        bias = model.score_bias()
        assert bias is not None
        np.testing.assert_allclose(bias.numpy(), expected, rtol=1e-5, atol=1e-5)
        vectors = model.item_vectors().numpy()
    np.testing.assert_allclose(extras["item_bias"], expected, rtol=1e-5, atol=1e-5)
    # an untrained item is what serving builds for a runtime item of the same text
    runtime = x[9:] @ extras["text_proj_w"] + extras["text_proj_b"]
    np.testing.assert_allclose(vectors[9:], runtime, rtol=1e-5, atol=1e-5)


def test_training_draws_one_id_dropout_mask_for_vectors_and_bias():
    model = featured_model(id_dropout=0.5).train()
    vectors, bias = model.output_layer()
    assert bias is not None
    dropped = ~torch.isclose(vectors[1:9], model.item_emb.weight[1:9]).all(dim=1)
    assert 0 < int(dropped.sum()) < 8  # seeded: some of the 8 trained IDs are hidden
    assert torch.equal(bias[1:9] != 0, dropped)  # a dropped ID gets its text bias, a kept one 0
    assert bool((bias[9:] != 0).all()) and float(bias[0].detach()) == 0.0
    assert model.score_bias() is None  # no boost in training
    from model.loss import sequence_loss

    loss = sequence_loss(model, pad([1, 2, 3, 4, 5]), pad([2, 3, 4, 5, 6]))
    loss.backward()
    assert model.text_bias is not None and model.text_bias.weight.grad is not None
    assert float(model.text_bias.weight.grad.abs().sum()) > 0  # the bias learns from the softmax
