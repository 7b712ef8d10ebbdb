"""export.compare: the one output comparison, and the gate that must not fail a correct fp16 run on near-ties."""

from __future__ import annotations

import numpy as np

from export.compare import MIN_COSINE, check, compare


def logits_with_near_ties(n: int = 64, classes: int = 1000, ties: int = 3, seed: int = 0) -> np.ndarray:
    """Random-input logits of a synthetic model: spread out, except `ties` rows whose top two differ by 1e-3."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, classes)).astype(np.float32)
    for i in range(ties):
        top = int(x[i].argmax())
        other = (top + 1) % classes
        x[i, other] = x[i, top] - 1e-3
    return x


def fp16_like(x: np.ndarray, ties: int = 3, scale: float = 3e-3, seed: int = 1) -> np.ndarray:
    """What a correct fp16 run gives: every logit moved by up to `scale`, which flips the near-tied rows."""
    y = x + np.random.default_rng(seed).uniform(-scale, scale, x.shape).astype(np.float32)
    for i in range(ties):
        top = int(x[i].argmax())
        y[i, (top + 1) % x.shape[1]] = y[i, top] + 1e-4
    return y


def test_compare_figures() -> None:
    ref = {"logits": np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]), "distillation_logits": np.zeros((2, 3))}
    same = compare(ref, ref)
    assert (same["max_abs_diff"], same["top1_agreement"], same["mean_kl"], same["samples"]) == (0.0, 1.0, 0.0, 2)
    assert abs(same["min_cosine"] - 1.0) < 1e-12 and same["decided"] == 2
    swapped = compare(ref, {"logits": np.roll(ref["logits"], 1, axis=1), "distillation_logits": np.full((2, 3), 0.5)})
    assert swapped["top1_agreement"] == 0.0 and swapped["max_abs_diff"] == 3.0 and swapped["mean_kl"] > 0
    labelled = compare(ref, ref, labels=np.array([0, 2]), names=("fp32", "int8"))
    assert (labelled["fp32_top1"], labelled["int8_top1"], labelled["top1_drop"]) == (0.5, 0.5, 0.0)
    assert "fp32_top1" not in compare(ref, ref, labels=np.array([-1, -1]))  # unlabelled images


def test_a_correct_fp16_run_on_near_ties_passes_on_random_inputs() -> None:
    ref = logits_with_near_ties()
    result = compare({"logits": ref}, {"logits": fp16_like(ref)})
    assert result["top1_agreement"] < 0.995  # plain top-1 at 99.5% would call this correct run a failure
    assert result["decided"] >= 60 and result["decided_top1_agreement"] == 1.0
    assert check(result, "fp16", 0.995, meaningful_top1=False) is None
    assert check(result, "fp16", 0.995, meaningful_top1=True) is not None  # photos + trained weights: every top-1 counts


def test_a_wrong_answer_on_a_decided_input_fails() -> None:
    ref = logits_with_near_ties()
    bad = fp16_like(ref)
    ranked = np.argsort(ref, axis=1)
    margins = ref[np.arange(len(ref)), ranked[:, -1]] - ref[np.arange(len(ref)), ranked[:, -2]]
    row = int(np.argmax(margins))  # the clearest input: its top-1 moves only if the backend is wrong
    bad[row, ranked[row, -2]] = ref[row, ranked[row, -1]] + 0.01
    result = compare({"logits": ref}, {"logits": bad})
    assert result["min_cosine"] >= MIN_COSINE["fp16"]  # too small a change for the cosine to see
    reason = check(result, "fp16", 0.995, meaningful_top1=False)
    assert reason is not None and "inputs whose reference margin exceeds" in reason, reason


def test_cosine_gates_random_inputs() -> None:
    ref = logits_with_near_ties(ties=0)
    noisy = ref + np.random.default_rng(2).normal(0, 0.2, ref.shape).astype(np.float32)
    result = compare({"logits": ref}, {"logits": noisy})
    assert result["min_cosine"] < MIN_COSINE["fp16"]
    assert "min cosine" in (check(result, "fp16", 0.0, meaningful_top1=False) or "")
