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


# ------------------------------------------------------------------------------------ weights split by an engine
def _reference(hidden, weight, labels, upstream):
    hidden = hidden.detach().clone().requires_grad_(True)
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, labels[:, None]).squeeze(-1)
    (log_probs * upstream.double()).sum().backward()
    return log_probs.detach(), hidden.grad.double()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(7, 8, generator=generator, requires_grad=True),
        torch.randn(40, 8, generator=generator),
        torch.randint(0, 40, (7,), generator=generator),
        torch.randn(7, generator=generator),
    )


def test_a_zero3_partitioned_head_is_gathered_in_the_forward_and_the_backward(monkeypatch):
    """Stand-in for DeepSpeed ZeRO-3: the parameter holds an empty shard (its full shape in ``ds_shape``) except
    inside the gather context, which the head must enter for the forward; a frozen head's backward needs no weight
    (the forward saved each position's gradient direction), so it gathers once per step, not twice."""
    from contextlib import contextmanager

    from trl_renyi.model import lm_head

    hidden, full, labels, upstream = _inputs()
    weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    weight.ds_shape = full.shape
    entered = []

    @contextmanager
    def gather(param):
        entered.append(param is weight)
        param.data = full
        try:
            yield
        finally:
            param.data = torch.empty(0)

    monkeypatch.setattr(lm_head, "gather_partitioned_parameters", gather)
    log_probs, _, _ = completion_log_probs(hidden, weight, labels, rows_per_chunk=3)
    (log_probs * upstream).sum().backward()
    assert entered == [True] and weight.numel() == 0  # gathered for the forward only
    ref_lp, ref_grad = _reference(hidden, full, labels, upstream)
    torch.testing.assert_close(log_probs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def test_an_fsdp2_dtensor_head_is_used_whole(tmp_path):
    """A real DTensor (FSDP2's parameter type) sharded on a one-process gloo mesh."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        hidden, full, labels, upstream = _inputs()
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]), requires_grad=False)
        log_probs, _, _ = completion_log_probs(hidden, weight, labels, rows_per_chunk=3)
        (log_probs * upstream).sum().backward()
    finally:
        dist.destroy_process_group()
    ref_lp, ref_grad = _reference(hidden, full, labels, upstream)
    torch.testing.assert_close(log_probs.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
