"""What ``forward`` may do inside an ensemble: indexing, splitting and reshaping that keep
the batch dimension are exact against the member loop; what could mix members, or what
the ensemble cannot batch, is refused with an error naming the module or function and
the line of ``forward``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.ensemble import Ensemble, UnsupportedModuleError
from tests.ensemble.test_ensemble import compare_with_loop


class Idiom(nn.Module):
    """conv → ``fn`` (the idiom under test) → flatten → linear; ``fn`` is a plain
    function called from forward, so torch.fx traces it like code written inline."""

    def __init__(self, fn, in_shape, conv=nn.Conv1d) -> None:
        super().__init__()
        self.fn = fn
        self.conv = conv(3, 4, 3, padding=1)
        with torch.no_grad():
            n = torch.flatten(fn(self.conv(torch.zeros(2, *in_shape))), 1).shape[1]
        self.fc = nn.Linear(n, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.fn(self.conv(x)), 1))


KEEPS_BATCH = {
    "ellipsis-slice": lambda x: x[..., :3],
    "ellipsis-stride": lambda x: x[..., ::2],
    "leading-colon-crop": lambda x: x[:, :, 1:-1],
    "leading-colon-int": lambda x: x[:, 0],
    "none-after-batch": lambda x: x[:, None, 1:],
    "tensor-index-dim1": lambda x: x[:, torch.tensor([3, 0, 0])],
    "chunk-dim1": lambda x: torch.chunk(x, 2, dim=1)[1] * torch.chunk(x, 2, dim=1)[0],
    "split-method": lambda x: torch.cat(x.split(2, 1)[::-1], 1),
    "split-function": lambda x: torch.split(x, [1, 3], dim=1)[1],
    "unbind-dim1": lambda x: torch.stack(torch.unbind(x, 1)[:2], 2),
    "narrow": lambda x: x.narrow(1, 0, 2),
    "select": lambda x: x.select(1, 0),
    "select-negative": lambda x: x.select(-1, 2),
    "index-select": lambda x: x.index_select(1, torch.tensor([2, 0])),
    "expand": lambda x: x[:, :, :1].expand(-1, 4, 6),
    "repeat": lambda x: x.repeat(1, 2, 1),
    "shape-prefix-view": lambda x: x.reshape(x.shape[:2] + (2, -1)),
    "shape-unpack-view": lambda x: x.view(x.shape[0], x.shape[1] * x.shape[2]),
    "cat-negative": lambda x: torch.cat([x, x[..., :1]], -1),
    # times x: softmax alone is blind to the conv bias (its true gradient would be 0)
    "softmax-negative": lambda x: x * F.softmax(x, -1),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(KEEPS_BATCH))
def test_batch_keeping_idioms_match_member_loop(name, train):
    """Each idiom converts and equals the member loop (outputs, parameter and input
    gradients, to the 1e-5 of compare_with_loop)."""
    fn = KEEPS_BATCH[name]
    compare_with_loop(lambda: Idiom(fn, (3, 8)), 3, (5, 3, 8), train=train)


def test_ellipsis_index_on_4d_activations_matches_member_loop():
    compare_with_loop(lambda: Idiom(lambda x: x[..., 1:, ::2], (3, 6, 7), conv=nn.Conv2d),
                      3, (4, 3, 6, 7), train=True)


def _refused(fn, in_shape=(3, 8)):
    if in_shape == (3, 6, 7):
        return lambda: Idiom(fn, in_shape, conv=nn.Conv2d)
    return lambda: Idiom(fn, in_shape)


REFUSED = {
    "int-index": (lambda x: x[0], "indexes the batch dimension"),
    "slice-index": (lambda x: x[1:], "indexes the batch dimension"),
    "none-first": (lambda x: x[None], "inserts a dimension before the batch"),
    "chunk-default-dim": (lambda x: torch.chunk(x, 2)[0], "splits dim 0"),
    "split-dim0": (lambda x: x.split(2, 0)[0], "splits dim 0"),
    "narrow-dim0": (lambda x: x.narrow(0, 0, 1), "narrows dim 0"),
    "select-dim0": (lambda x: x.select(0, 1), "selects from dim 0"),
    "unbind-default": (lambda x: torch.unbind(x)[0], "unbinds dim 0"),
    "expand-dim0": (lambda x: x[:1].expand(6, -1, -1), "indexes the batch dimension"),
    "expand-new-size": (lambda x: x.unsqueeze(1).expand(2, 3, -1, -1), "expands dim 0"),
    "separated-tensor-indices": (lambda x: x[:, torch.tensor([0]), :, torch.tensor([0])],
                                 "tensor indices separated by slices", (3, 6, 7)),
    "setitem-row": (lambda x: x.index_fill(0, torch.tensor([0]), 0.0),
                    "not known to keep the rows"),
    "mean-dim0": (lambda x: x - x.mean(0), "works along dim 0"),
    "functional-dropout": (lambda x: F.dropout(x, 0.5), "global random generator"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_batch_mixing_idioms_are_refused(name):
    fn, message, *shape = REFUSED[name]
    with pytest.raises(UnsupportedModuleError, match=message):
        Ensemble(_refused(fn, *shape), 2)


class WritesRow(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        y[0] = 0.0
        return y


def test_in_place_batch_row_write_names_the_line():
    with pytest.raises(UnsupportedModuleError,
                       match=r"WritesRow.forward writes into a tensor by index in place at "
                             r"test_forward_check.py:\d+ in forward: `y\[0\] = 0.0`"):
        Ensemble(WritesRow, 2)


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.lstm(x)[0])


def test_tuple_output_error_names_the_producing_module_and_line():
    """Indexing the LSTM's (output, state) tuple is not a batch index: the error is about
    the LSTM, at the line that calls it."""
    with pytest.raises(UnsupportedModuleError,
                       match=r"module 'lstm' \(LSTM\) \(called at test_forward_check.py:\d+ "
                             r"in forward: `return self.fc\(self.lstm\(x\)\[0\]\)`\) is a "
                             r"recurrent layer") as err:
        Ensemble(LSTMHead, 2)
    assert "getitem" not in str(err.value)


class MixingAttention(nn.Module):
    """Self-attention written out by hand, attending across the batch (dim 0)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = torch.softmax(q @ k.transpose(0, 1), 0)
        return scores @ v


class TorchAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_attention_errors_name_module_or_function_and_line():
    with pytest.raises(UnsupportedModuleError,
                       match=r"method 'transpose' \(test_forward_check.py:\d+ in forward: "
                             r"`scores = .*`\), which moves dim 0"):
        Ensemble(MixingAttention, 2)
    with pytest.raises(UnsupportedModuleError,
                       match=r"module 'attn' \(MultiheadAttention\) \(called at "
                             r"test_forward_check.py:\d+ in forward: .*attention layer"):
        Ensemble(TorchAttention, 2)


class EvalOnlyMix(nn.Module):
    """Batch mixing in eval mode only: the check traces both modes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = self.lin(x)
        return x if self.training else x - x.mean(0)


def test_both_modes_are_checked():
    with pytest.raises(UnsupportedModuleError, match="method 'mean'.*works along dim 0"):
        Ensemble(EvalOnlyMix, 2)


class Squeezed(nn.Module):
    """x[..., 0] after a reduction to [B, C]: on a 2-d tensor it indexes dim 1, on the
    1-d tensor of a sum over all later dims it would index the batch."""

    def __init__(self, keep: bool):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.keep = keep

    def forward(self, x):
        y = self.lin(x)
        y = y.sum(-1, keepdim=self.keep)
        return y[..., 0]


def test_ellipsis_index_rank_is_checked_at_the_first_call():
    ok = Ensemble(lambda: Squeezed(True), 2)
    assert ok(torch.randn(2, 5, 4)).shape == (2, 5)
    bad = Ensemble(lambda: Squeezed(False), 2)  # rank unknown until the input's is known
    with pytest.raises(UnsupportedModuleError,
                       match=r"function 'getitem' \(test_forward_check.py:\d+ in forward: "
                             r"`return y\[\.\.\., 0\]`\), which indexes a 1-d tensor"):
        bad(torch.randn(2, 5, 4))
    with pytest.raises(UnsupportedModuleError, match="indexes a 1-d tensor"):
        bad.forward_shared(torch.randn(5, 4))


def test_checked_ensemble_pickles_after_its_first_call():
    import pickle

    ens = Ensemble(lambda: Squeezed(True), 2).eval()
    x = torch.randn(2, 5, 4)
    expected = ens(x)  # the rank check ran on a meta copy of the model
    assert torch.equal(pickle.loads(pickle.dumps(ens))(x), expected)


class NegativeDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return F.softmax(self.lin(x).sum(1), -1)


def test_negative_dim_resolving_to_the_batch_is_refused_at_the_first_call():
    ens = Ensemble(NegativeDim, 2)
    with pytest.raises(UnsupportedModuleError, match=r"dim \(-1,\) of a 1-d tensor"):
        ens(torch.randn(2, 5, 4))


def test_docs_converted_list_is_the_converters_table():
    from pathlib import Path

    from scaleinv_kernels.ensemble.convert import supported_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "ensembles.md"
    lines = doc.read_text().splitlines()
    start = lines.index("  <!-- converted:start -->")
    end = lines.index("  <!-- converted:end -->")
    assert "\n".join(lines[start + 1:end]) == supported_markdown()
