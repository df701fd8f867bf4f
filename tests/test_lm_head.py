import pytest
import torch

from trl_renyi.model.lm_head import add_completion_lm_head, completion_log_probs, supports_completion_head


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 64])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_chunked_log_probs_match_log_softmax(rows_per_chunk, weight_grad):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    weight = torch.randn(50, 8, generator=generator).requires_grad_(weight_grad)
    labels = torch.randint(0, 50, (10,), generator=generator)
    upstream = torch.randn(10, generator=generator)

    log_probs, entropy, top1 = completion_log_probs(hidden, weight, labels, rows_per_chunk)
    (log_probs * upstream).sum().backward()
    grads = (hidden.grad.clone(), weight.grad.clone() if weight_grad else None)

    hidden.grad = None
    if weight_grad:
        weight.grad = None
    reference = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    ref_lp = reference.gather(-1, labels[:, None]).squeeze(-1)
    (ref_lp * upstream.double()).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(reference.exp() * reference).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(top1, reference.argmax(-1) == labels)
    torch.testing.assert_close(grads[0].double(), hidden.grad.double(), rtol=1e-4, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(grads[1].double(), weight.grad.double(), rtol=1e-4, atol=1e-5)


def test_patched_forward_scores_only_labelled_positions(make_model):
    model = make_model()
    assert supports_completion_head(model) and add_completion_lm_head(model)
    input_ids = torch.randint(3, 300, (2, 9))
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels, completion_head=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1]  # unpatched path: plain logits
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    mask = labels[:, 1:] != -100
    assert torch.equal(out.label_mask, mask)
    torch.testing.assert_close(out.log_probs, expected * mask, rtol=1e-5, atol=1e-5)
    assert (out.log_probs[~mask] == 0).all()
