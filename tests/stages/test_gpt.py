import pytest
import torch

from kdcache.stages.models.gpt import (
    GPT,
    SIZES,
    GPTConfig,
    load_checkpoint,
    position_ids_from_segments,
    save_checkpoint,
)
from kdcache.storage.errors import ConfigError, FormatVersionError

V, BLOCK = 97, 32


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_size("nano", vocab_size=V, block_size=BLOCK)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="divisible by n_head"):
        GPTConfig(vocab_size=10, n_layer=1, n_head=3, n_embd=64, block_size=8)
    with pytest.raises(ConfigError, match="vocab_size.*block_size"):  # every problem at once
        GPTConfig(vocab_size=0, n_layer=1, n_head=1, n_embd=8, block_size=-1)
    with pytest.raises(
        ConfigError, match="unknown GPT size 'huge'.*nano, micro, mini, small, base"
    ):
        GPTConfig.from_size("huge", vocab_size=10, block_size=8)


def test_sizes_grow_and_base_is_large_enough():
    counts = []
    for name in SIZES:
        with torch.device("meta"):  # no memory, no init cost for the 100M+ model
            counts.append(GPT(GPTConfig.from_size(name, 4096, 256)).num_parameters())
    assert counts == sorted(counts)
    assert 0.1e6 <= counts[0] <= 0.3e6  # nano
    assert counts[-1] >= 100e6  # base, the GPU benchmark


def test_num_parameters(model):
    L, C = model.config.n_layer, model.config.n_embd
    non_embedding = L * (12 * C * C + 2 * C) + C  # attn 4C^2 + mlp 8C^2 + 2 LayerNorms, ln_f
    assert model.num_parameters() == non_embedding
    assert model.num_parameters(non_embedding=False) == non_embedding + (V + BLOCK) * C


def test_forward_equals_head_of_hidden_states(model):
    x = tokens(2, 16)
    logits = model(x)
    assert logits.shape == (2, 16, V)
    h = model.hidden_states(x)
    assert h.shape == (2, 16, model.config.n_embd)
    torch.testing.assert_close(model.lm_head(h), logits, rtol=0, atol=1e-6)
    assert model.lm_head.weight is model.wte.weight  # tied


def test_causal_future_tokens_do_not_change_past_logits(model):
    x = tokens(1, 20)
    y = x.clone()
    y[0, 12] = (x[0, 12] + 1) % V
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_position_ids_from_segments():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert torch.equal(position_ids_from_segments(seg), expected)


def test_packed_document_matches_document_alone(model):
    doc_a, doc_b, doc_c = tokens(7, seed=2), tokens(9, seed=3), tokens(5, seed=4)
    alone_b = model(doc_b[None])[0]  # (9, V)
    alone_c = model(doc_c[None])[0]
    # row 0: [a a a a a a a b b b b b b b b b], row 1: [c c c c c a a a a a a a b b b b]
    rows = torch.stack([torch.cat([doc_a, doc_b]), torch.cat([doc_c, doc_a, doc_b[:4]])])
    seg = torch.tensor([[0] * 7 + [1] * 9, [0] * 5 + [1] * 7 + [2] * 4])
    packed = model(rows, position_ids=position_ids_from_segments(seg), segment_ids=seg)
    torch.testing.assert_close(packed[0, 7:], alone_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1, :5], alone_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1, 12:], alone_b[:4], rtol=0, atol=1e-5)
    # Without the segment mask, b would attend to a: the test above can fail.
    leaky = model(rows[:1], position_ids=position_ids_from_segments(seg[:1]))
    assert not torch.allclose(leaky[0, 7:], alone_b, atol=1e-3)


def test_too_long_and_misshaped_inputs_raise_config_error(model):
    with pytest.raises(
        ConfigError, match=f"length 33 exceeds .* block_size={BLOCK}; use a shorter"
    ):
        model(tokens(1, BLOCK + 1))
    with pytest.raises(ConfigError, match="segment_ids must have the shape"):
        model(tokens(1, 8), segment_ids=torch.zeros(1, 7, dtype=torch.long))


def test_checkpoint_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "ckpt" / "student.pt", step=3, losses=[1.5, 1.25])
    assert not list(path.parent.glob("*.partial"))
    loaded, extra = load_checkpoint(path)
    assert loaded.config == model.config
    assert extra == {"step": 3, "losses": [1.5, 1.25]}
    assert loaded.lm_head.weight is loaded.wte.weight  # tying survives the round trip
    x = tokens(2, 12)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_checkpoint_rejects_other_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a kdcache GPT checkpoint: torch.load failed"):
        load_checkpoint(text)
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(ConfigError, match="expected format 'kdcache-gpt', found None"):
        load_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "kdcache-gpt", "version": 99}, newer)
    with pytest.raises(FormatVersionError, match="version 99; this kdcache reads version 1"):
        load_checkpoint(newer)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_checkpoint_rejects_reserved_extra_keys(model, tmp_path):
    with pytest.raises(ConfigError, match="clash with the reserved keys"):
        save_checkpoint(model, tmp_path / "x.pt", config={"lr": 1})
