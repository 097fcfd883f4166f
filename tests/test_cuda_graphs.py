"""The replay logic of megassm/model/cuda_graphs.py on CPU: the real autograd Function (_Replay) and capture context
(_Pieces.capture) around stand-in graphs that write into static buffers as CUDA graphs do. What they check is how
autograd treats those buffers: gradients summed over micro batches, a pass replayed over before its backward, and a
capture that fails. The graphs themselves are compared with the eager blocks on the GPU (tools/check_graphs.py)."""

import pytest
import torch

from megassm.model import cuda_graphs
from megassm.model.cuda_graphs import _Pieces, _Replay

SHAPE = (2, 5, 4)


class _Pass:
    def __init__(self, replay):
        self.replay = replay


class OneLinearGroup:
    """One group of 'blocks' computing (h, h @ W) as BlockGraphs lays out its buffers: the forward replay writes the
    outputs and an activation kept for the backward into static buffers, and temporaries where the parameter gradients'
    buffers lie (all graphs share one memory pool); the backward replay writes the input and parameter gradients."""

    copy_adopted_gradients = cuda_graphs.BlockGraphs.copy_adopted_gradients

    def __init__(self, weight: torch.Tensor):
        h = torch.zeros(SHAPE)
        self.params = [(weight,)]
        self.ids = (torch.zeros(SHAPE[:2], dtype=torch.int32), None)
        self.inputs = [(h, None), (torch.zeros(SHAPE), torch.zeros(*SHAPE[:2], weight.shape[1]))]
        self.grad_inputs = [(torch.zeros(SHAPE), None), (torch.zeros(SHAPE), torch.zeros(*SHAPE[:2], weight.shape[1]))]
        self.grad_params = [(torch.zeros_like(weight),)]
        self.forward_replays = [0]
        kept = torch.zeros(SHAPE)

        def forward():
            for buffers in self.grad_params:
                buffers[0].fill_(7.0)
            kept.copy_(h)
            self.inputs[1][0].copy_(h)
            self.inputs[1][1].copy_(h @ weight.detach())

        def backward():
            grad_h, grad_update = self.grad_inputs[1]
            self.grad_inputs[0][0].copy_(grad_h + grad_update @ weight.detach().T)
            self.grad_params[0][0].copy_(torch.einsum("bld,ble->de", kept, grad_update))

        self.forward_passes, self.backward_passes = [_Pass(forward)], [_Pass(backward)]


def graphed_loss(graphs: OneLinearGroup, weight: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    h, update = _Replay.apply(graphs, 0, x, None, graphs.ids[0], None, weight)
    return ((h + update.sum(-1, keepdim=True)) * target).sum()


def eager_grad(weight: torch.Tensor, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    weight = weight.detach().clone().requires_grad_()
    sum(((x + (x @ weight).sum(-1, keepdim=True)) * target).sum() for x, target in batches).backward()
    return weight.grad


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator).requires_grad_()
    batches = [(torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)) for _ in range(2)]
    return weight, OneLinearGroup(weight), batches


def test_one_micro_batch_adopts_the_gradient_buffer(setup):
    weight, graphs, batches = setup
    graphed_loss(graphs, weight, *batches[0]).backward()
    assert weight.grad.data_ptr() == graphs.grad_params[0][0].data_ptr()  # no copy, no add
    torch.testing.assert_close(weight.grad, eager_grad(weight, batches[:1]))


@pytest.mark.parametrize("grad_at_start", ["none", "zeroed in place"])
def test_micro_batches_sum_their_gradients(setup, grad_at_start):
    """With .grad None at the start of a step, the first backward adopts the buffer; the second forward and backward
    replays overwrite it."""
    weight, graphs, batches = setup
    weight.grad = None if grad_at_start == "none" else torch.zeros_like(weight)
    for x, target in batches:
        graphed_loss(graphs, weight, x, target).backward()
    torch.testing.assert_close(weight.grad, eager_grad(weight, batches))


def test_two_backwards_of_one_pass_sum_their_gradients(setup):
    """The first backward adopts the buffer; the second one's replay overwrote it (twice the second loss's gradient)."""
    weight, graphs, batches = setup
    (x, target_a), (_, target_b) = batches
    h, update = _Replay.apply(graphs, 0, x, None, graphs.ids[0], None, weight)
    out = h + update.sum(-1, keepdim=True)
    (out * target_a).sum().backward(retain_graph=True)
    (out * target_b).sum().backward()
    torch.testing.assert_close(weight.grad, eager_grad(weight, [(x, target_a), (x, target_b)]))


def test_a_pass_copies_every_group_s_adopted_gradients_before_its_first_replay(setup):
    """The first group's forward replay may overwrite a later group's buffers too: a .grad that is still a buffer,
    of any group, is copied before it."""
    weight, graphs, batches = setup
    later = torch.nn.Parameter(torch.ones(2))
    graphs.params.append((later,))
    graphs.grad_params.append((torch.full((2,), 3.0),))
    later.grad = graphs.grad_params[1][0]  # adopted by the backward of the step's previous micro batch
    graphed_loss(graphs, weight, *batches[0])
    torch.testing.assert_close(later.grad, torch.full((2,), 3.0))


@pytest.mark.parametrize("between", ["a forward with gradients", "a forward without gradients (validation)"])
def test_a_backward_after_another_forward_raises(setup, between):
    weight, graphs, batches = setup
    loss = graphed_loss(graphs, weight, *batches[0])
    with torch.set_grad_enabled(between == "a forward with gradients"):
        graphed_loss(graphs, weight, *batches[1])
    with pytest.raises(RuntimeError, match="replayed another forward pass of this shape before this pass's backward"):
        loss.backward()


def test_a_failed_capture_ends_the_capture_and_raises_its_own_error(monkeypatch):
    events = []

    class Graph:
        def capture_begin(self, **kwargs):
            events.append("begin")

        def capture_end(self):
            events.append("end")
            raise RuntimeError("capture invalidated")  # as CUDA reports a capture cut short

    monkeypatch.setattr(cuda_graphs.torch.cuda, "CUDAGraph", Graph)
    pieces = _Pieces(pool=(0, 0))
    with pytest.raises(torch.OutOfMemoryError, match="during capture"):
        with pieces.capture():
            raise torch.OutOfMemoryError("during capture")
    assert events == ["begin", "end"]
