"""The stage-two losses against direct float64 formulas, gradcheck, masking and chunking."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.stages.train.losses import (
    JSD,
    LOSSES,
    ForwardKL,
    ForwardKLWithTail,
    HardCE,
    Mixed,
    ReverseKL,
    SoftCE,
    build_loss,
    chunked_loss,
)
from kdcache.storage.errors import ConfigError

KD_LOSSES = [ForwardKL, ForwardKLWithTail, ReverseKL, JSD, SoftCE]


def make_batch(n=6, v=20, k=5, *, seed=0, dtype=torch.float32, student_vocab=None):
    """Random student logits and a teacher cache captured from random teacher logits."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2  # (N, V)
    student = torch.randn(n, student_vocab or v, generator=g, dtype=torch.float64) * 2
    full = teacher.log_softmax(-1)  # (N, V) float64 teacher log-probs at T=1
    logprobs, ids = full.topk(k, dim=-1)
    outside = full.scatter(1, ids, -math.inf)
    log_tail = torch.logsumexp(outside, -1)  # -inf when k == V
    labels = torch.randint(0, v, (n,), generator=g)
    return {
        "student": student.to(dtype),
        "full": full,
        "topk_ids": ids,
        "topk_logprobs": logprobs.float(),
        "log_tail": log_tail.float(),
        "labels": labels,
    }


def targets(b, **over):
    t = {key: b[key] for key in ("topk_ids", "topk_logprobs", "log_tail", "labels")}
    t.update(over)
    return t


def masked_mean(values, mask):
    return values[mask].sum() / max(int(mask.sum()), 1)


# -- references in float64 --------------------------------------------------------------------


def ref_topk(b, kind, t=1.0, beta=0.5):
    s = b["student"].double()
    log_q = (s.gather(1, b["topk_ids"]) / t).log_softmax(-1)
    log_p = (b["topk_logprobs"].double() / t).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    if kind is ForwardKL:
        rows = (p * (log_p - log_q)).sum(-1)
    elif kind is ReverseKL:
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        rows = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    return rows * t**2


def ref_tail(b, t=1.0):
    """k+1 bucket KL, direct: student tail mass summed over the non-top-k probabilities."""
    s = b["student"].double()
    q = s.softmax(-1)
    in_topk = torch.zeros_like(q, dtype=torch.bool).scatter(1, b["topk_ids"], True)
    q_buckets = torch.cat([q.gather(1, b["topk_ids"]), (q * ~in_topk).sum(-1, keepdim=True)], -1)
    p_buckets = torch.cat([b["topk_logprobs"].double(), b["log_tail"].double()[:, None]], -1).exp()
    # tempered bucket distributions (the documented choice): softmax(log buckets / T)
    log_q = (q_buckets.log() / t).log_softmax(-1)
    log_p = (p_buckets.log() / t).log_softmax(-1)
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p > -math.inf, terms, 0.0).sum(-1) * t**2  # 0 log 0 = 0


# -- values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", [ForwardKL, ForwardKLWithTail])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_full_vocabulary_cache_equals_full_forward_kl(loss_cls, t):
    b = make_batch(n=7, v=30, k=30)
    assert torch.isinf(b["log_tail"]).all()
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    loss = loss_cls(temperature=t)(b["student"], **targets(b), mask=mask)
    teacher = (b["full"] / t).log_softmax(-1)
    student = (b["student"].double() / t).log_softmax(-1)
    rows = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    expected = masked_mean(rows, mask) * t**2
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.5, 3.0])
def test_tail_loss_equals_bucket_formula(t):
    b = make_batch(n=8, v=40, k=6, seed=1)
    loss = ForwardKLWithTail(temperature=t)(b["student"], **targets(b))
    torch.testing.assert_close(loss.double(), ref_tail(b, t).mean(), rtol=1e-5, atol=1e-6)


def test_tail_loss_counts_padded_student_vocabulary_as_tail():
    b = make_batch(n=5, v=16, k=16, student_vocab=24, seed=2)  # k = teacher V, student padded
    loss = ForwardKLWithTail()(b["student"], **targets(b))
    torch.testing.assert_close(loss.double(), ref_tail(b).mean(), rtol=1e-5, atol=1e-6)
    # padded logits at -inf: a student tail of zero mass, still finite with a finite gradient
    s = b["student"].clone()
    s[:, 16:] = -math.inf
    s.requires_grad_()
    loss = ForwardKLWithTail()(s, **targets(b))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_tail_loss_accurate_when_student_tail_mass_is_tiny():
    # The top-k hold all but ~1e-12 of the student mass: log(1 - sum q_topk) in float32 rounds
    # that tail to 0 (an infinite loss) or to noise. The teacher keeps 5% in its tail, so both
    # the value (p_tail log(p_tail / q_tail)) and the gradient on the tail logits hinge on it.
    b = make_batch(n=4, v=50, k=5, seed=3)
    s = b["student"].clone()
    s.scatter_(1, b["topk_ids"], 25.0 + torch.randn(4, 5))
    b["student"] = s
    b["log_tail"] = torch.full((4,), math.log(0.05))
    x = s.clone().requires_grad_()
    value = ForwardKLWithTail()(x, **targets(b))
    value.backward()
    x64 = s.double().requires_grad_()
    expected = ref_tail({**b, "student": x64}).mean()
    expected.backward()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0.0)
    outside = torch.ones_like(s, dtype=torch.bool).scatter(1, b["topk_ids"], False)
    assert x64.grad[outside].abs().max() > 1e-4  # the check below is not vacuous
    torch.testing.assert_close(x.grad[outside].double(), x64.grad[outside], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("loss_cls", [ForwardKL, ReverseKL, JSD])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_topk_losses_equal_direct_formulas(loss_cls, t):
    b = make_batch(n=6, v=25, k=7, seed=4)
    loss = loss_cls(temperature=t)(b["student"], **targets(b))
    torch.testing.assert_close(loss.double(), ref_topk(b, loss_cls, t).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_soft_ce_is_cross_entropy_to_renormalized_topk_under_full_softmax(t):
    b = make_batch(n=6, v=25, k=7, seed=4)
    mask = torch.tensor([1, 0, 1, 1, 1, 1], dtype=torch.bool)
    loss = SoftCE(temperature=t)(b["student"], **targets(b), mask=mask)
    w = (b["topk_logprobs"].double() / t).softmax(-1)  # teacher renormalized over its top-k
    log_q = (b["student"].double() / t).log_softmax(-1).gather(1, b["topk_ids"])  # full softmax
    expected = masked_mean(-(w * log_q).sum(-1), mask) * t**2
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # Differs from forward_kl, whose student normalizer covers only the k ids:
    assert not torch.isclose(loss, ForwardKL(temperature=t)(b["student"], **targets(b), mask=mask))


def test_mixed_soft_ce_at_t1_shares_one_pass_and_equals_its_parts():
    b = make_batch(seed=8)
    mix = Mixed(SoftCE(), 0.4)
    assert mix.shared_pass and not Mixed(SoftCE(temperature=2.0), 0.4).shared_pass
    x = b["student"].clone().requires_grad_()
    loss = mix(x, **targets(b))
    loss.backward()
    y = b["student"].clone().requires_grad_()
    expected = 0.4 * SoftCE()(y, **targets(b)) + 0.6 * F.cross_entropy(y, b["labels"])
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_jsd_beta(beta):
    b = make_batch(seed=5)
    loss = JSD(beta=beta)(b["student"], **targets(b))
    expected = ref_topk(b, JSD, beta=beta).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_temperature_scaling_is_t_squared_times_tempered_kl():
    # (the tail loss tempers its k+1 buckets instead: test_tail_loss_equals_bucket_formula)
    b = make_batch(seed=6)
    for loss_cls in [ForwardKL, ReverseKL, JSD]:
        at_1 = loss_cls()(b["student"], **targets(b))
        at_2 = loss_cls(temperature=2.0)(b["student"], **targets(b))
        # tempering both sides by 2 is the same as halving logits and log-probs at T=1
        halved = loss_cls()(
            b["student"] / 2,
            **targets(b, topk_logprobs=b["topk_logprobs"] / 2),
        )
        assert not torch.isclose(at_1, at_2)
        torch.testing.assert_close(at_2, 4 * halved, rtol=1e-5, atol=1e-6)


def test_hard_ce_equals_cross_entropy_with_ignore_index():
    b = make_batch(seed=7)
    labels = b["labels"].clone()
    labels[[1, 4]] = -100
    loss = HardCE()(b["student"], labels=labels)
    torch.testing.assert_close(loss, F.cross_entropy(b["student"], labels, ignore_index=-100))


@pytest.mark.parametrize("kd_cls", KD_LOSSES)
def test_mixed_equals_weighted_sum_of_its_parts(kd_cls):
    b = make_batch(seed=8)
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    labels = b["labels"].clone()
    labels[0] = -100
    kw = targets(b, labels=labels) | {"mask": mask}
    loss = Mixed(kd_cls(temperature=1.5), 0.3)(b["student"], **kw)
    kd = kd_cls(temperature=1.5)(b["student"], **kw)
    ce = F.cross_entropy(b["student"][mask], labels[mask], ignore_index=-100)
    torch.testing.assert_close(loss, 0.3 * kd + 0.7 * ce)


def test_mixed_alpha_one_needs_no_labels_and_alpha_zero_no_topk():
    b = make_batch(seed=9)
    kd = ForwardKL()(b["student"], b["topk_ids"], b["topk_logprobs"])
    torch.testing.assert_close(Mixed(ForwardKL(), 1.0)(b["student"], **targets(b, labels=None)), kd)
    ce = F.cross_entropy(b["student"], b["labels"])
    torch.testing.assert_close(Mixed(ForwardKL(), 0.0)(b["student"], labels=b["labels"]), ce)


def test_bfloat16_logits_are_upcast():
    b = make_batch(n=8, v=64, k=8, seed=10)
    s16 = b["student"].bfloat16().requires_grad_()
    for loss in [Mixed(ForwardKLWithTail(), 0.5), Mixed(JSD(), 0.5)]:
        value = loss(s16, **targets(b))
        assert value.dtype == torch.float32
        expected = loss(s16.detach().float(), **targets(b))
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(value, s16)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


# -- gradients ---------------------------------------------------------------------------------

ALL_LOSSES = [
    ForwardKL(temperature=1.5),
    ForwardKLWithTail(temperature=1.5),
    ForwardKLWithTail(k=3),
    ReverseKL(temperature=0.7),
    JSD(beta=0.3, temperature=2.0),
    HardCE(),
    Mixed(ForwardKL(), 0.4),
    Mixed(ForwardKLWithTail(temperature=2.0), 0.6),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_gradcheck_float64(loss):
    b = make_batch(n=5, v=12, k=5, seed=11)
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    labels = b["labels"].clone()
    labels[2] = -100
    kw = targets(b, labels=labels) | {"mask": mask}
    s = b["student"].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, **kw), (s,), eps=1e-6, atol=1e-6)


# -- truncation, masking -----------------------------------------------------------------------


@pytest.mark.parametrize("loss_cls", KD_LOSSES)
def test_truncating_k_equals_caching_fewer_entries(loss_cls):
    wide, narrow = make_batch(k=8, seed=12), make_batch(k=3, seed=12)
    assert torch.equal(wide["topk_ids"][:, :3], narrow["topk_ids"])
    truncated = loss_cls(k=3)(wide["student"], **targets(wide))
    cached = loss_cls()(narrow["student"], **targets(narrow))
    untruncated = loss_cls()(wide["student"], **targets(wide))
    torch.testing.assert_close(truncated, cached, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(truncated, untruncated)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_masked_rows_affect_neither_value_nor_gradient(loss):
    b = make_batch(n=6, v=15, k=5, seed=13)
    mask = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    labels = b["labels"].clone()
    labels[~mask] = -100
    # garbage in the padding rows: invalid ids, nan log-probs and tails, huge logits
    ids, logprobs, tail = b["topk_ids"].clone(), b["topk_logprobs"].clone(), b["log_tail"].clone()
    ids[~mask], logprobs[~mask], tail[~mask] = -1, math.nan, math.nan
    s = b["student"].clone()
    s[~mask] = 1e4
    s.requires_grad_()
    value = loss(s, ids, logprobs, tail, mask=mask, labels=labels)
    value.backward()
    kept = {key: val[mask] for key, val in targets(b, labels=labels).items()}
    x = b["student"][mask].clone().requires_grad_()
    expected = loss(x, **kept)
    expected.backward()
    torch.testing.assert_close(value, expected)
    assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))
    torch.testing.assert_close(s.grad[mask], x.grad)


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_all_masked_batch_gives_zero_and_a_zero_gradient(loss):
    b = make_batch(n=4, v=10, k=4, seed=14)
    mask = torch.zeros(4, dtype=torch.bool)
    labels = torch.full((4,), -100)
    s = b["student"].clone().requires_grad_()
    value = loss(s, **targets(b, labels=labels), mask=mask)
    assert value.requires_grad and value.item() == 0.0
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# -- chunked driver ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [Mixed(ForwardKLWithTail(temperature=2.0), 0.3), JSD(), Mixed(ReverseKL(), 0.5), HardCE()],
    ids=repr,
)
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_chunked_equals_unchunked(loss, chunk_size):
    torch.manual_seed(15)
    n, c, v = 37, 16, 50
    b = make_batch(n=n, v=v, k=6, seed=15)
    mask = torch.rand(n) > 0.2
    labels = b["labels"].masked_fill(torch.rand(n) > 0.7, -100)
    kw = targets(b, labels=labels) | {"mask": mask}
    head = torch.nn.Linear(c, v)
    hidden = torch.randn(n, c, requires_grad=True)

    expected = loss(head(hidden), **kw)
    ref_grads = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
    value = chunked_loss(loss, hidden, head, chunk_size=chunk_size, **kw)
    grads = torch.autograd.grad(value, [hidden, head.weight, head.bias])
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # a bare weight tensor (+ bias) as head, a scaled output, and the no-grad path
    w = head.weight.detach().clone().requires_grad_()
    value = chunked_loss(loss, hidden, w, bias=head.bias, chunk_size=chunk_size, **kw)
    (3 * value).backward()
    torch.testing.assert_close(w.grad, 3 * ref_grads[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss(loss, hidden, head, **kw), expected.detach())


def test_chunked_all_masked_gives_zero_and_zero_gradient():
    b = make_batch(n=9, v=12, k=4, seed=16)
    hidden = torch.randn(9, 5, requires_grad=True)
    head = torch.nn.Linear(5, 12, bias=False)
    kw = targets(b) | {"mask": torch.zeros(9, dtype=torch.bool)}
    value = chunked_loss(ForwardKLWithTail(), hidden, head, chunk_size=4, **kw)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


# -- registry and configuration errors ---------------------------------------------------------


def test_build_loss_registry():
    assert set(LOSSES) == {"forward_kl", "forward_kl_tail", "reverse_kl", "jsd", "ce", "soft_ce"}
    assert isinstance(build_loss("forward_kl", temperature=2.0, k=4), ForwardKL)
    jsd = build_loss("jsd", beta=0.2)
    assert isinstance(jsd, JSD) and jsd.beta == 0.2
    mixed = build_loss("forward_kl_tail", alpha=0.5)
    assert isinstance(mixed, Mixed) and isinstance(mixed.kd, ForwardKLWithTail)
    assert mixed.needs_tail and build_loss("forward_kl_tail").needs_tail
    assert not any(build_loss(name).needs_tail for name in ("forward_kl", "reverse_kl", "ce"))
    assert isinstance(build_loss("ce"), HardCE)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ForwardKL(temperature=0.0), "temperature > 0, found 0.0"),
        (lambda: JSD(temperature=-1.0), "temperature > 0, found -1.0"),
        (lambda: ReverseKL(k=0), "k >= 1"),
        (lambda: Mixed(ForwardKL(), 1.5), r"alpha in \[0, 1\].*found 1.5"),
        (lambda: Mixed(ForwardKL(), -0.1), r"alpha in \[0, 1\].*found -0.1"),
        (lambda: JSD(beta=0.0), "beta strictly between 0 and 1, found 0.0"),
        (lambda: JSD(beta=1.0), "beta strictly between 0 and 1, found 1.0"),
        (lambda: build_loss("kl"), "forward_kl.*forward_kl_tail.*found 'kl'"),
        (lambda: build_loss("ce", alpha=0.5), "no alpha"),
    ],
)
def test_config_errors_at_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_config_errors_at_call():
    b = make_batch(k=5)
    with pytest.raises(ConfigError, match="cached k=5, found k=7"):
        ForwardKL(k=7)(b["student"], **targets(b))
    with pytest.raises(ConfigError, match="this cache stores no tail mass; use --loss forward_kl"):
        ForwardKLWithTail()(b["student"], **targets(b, log_tail=None))
    with pytest.raises(ConfigError, match="no tail mass"):
        Mixed(ForwardKLWithTail(), 0.5)(b["student"], **targets(b, log_tail=None))
    with pytest.raises(ConfigError, match=r"ids in \[0, 10\)"):
        ForwardKL()(b["student"][:, :10], **targets(b))
    with pytest.raises(ConfigError, match="labels"):
        HardCE()(b["student"])
    with pytest.raises(ConfigError, match="chunk_size >= 1"):
        chunked_loss(
            HardCE(), torch.randn(6, 3), torch.randn(20, 3), labels=b["labels"], chunk_size=0
        )
    # every message is one line: expected, found, fix
    with pytest.raises(ConfigError) as info:
        ForwardKL(k=7)(b["student"], **targets(b))
    assert "\n" not in str(info.value) and "expected" in str(info.value)
