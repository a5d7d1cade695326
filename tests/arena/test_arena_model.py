"""The arena's GPT: causal, weight-tied, preset sizes."""

import pytest
import torch

from shine.arena.model import MODEL_PRESETS, build_model


@pytest.mark.parametrize("preset", ["nano", "tiny"])
def test_changing_a_future_byte_leaves_earlier_logits_unchanged(preset):
    torch.manual_seed(0)
    model = build_model(preset, seq_len=16).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10] = (x[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_head_is_tied_to_the_embedding_and_seeded_init_repeats():
    torch.manual_seed(3)
    a = build_model("nano", seq_len=8)
    torch.manual_seed(3)
    b = build_model("nano", seq_len=8)
    assert a.head.weight is a.tok_emb.weight
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    n_layer, _, d_model = MODEL_PRESETS["nano"]
    assert len(a.blocks) == n_layer and a.tok_emb.weight.shape == (256, d_model)


def test_loss_starts_near_uniform_and_unknown_preset_is_an_error():
    torch.manual_seed(0)
    model = build_model("nano", seq_len=8)
    x, y = torch.randint(0, 256, (2, 4, 8))
    assert abs(model.loss(x, y).item() - torch.log(torch.tensor(256.0)).item()) < 0.1
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge", seq_len=8)
