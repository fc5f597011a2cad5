"""torch.onnx.export of models holding lstm_fused.LSTM / GRU, in both exporters, run in
onnxruntime and compared with the eager module on fresh inputs (lstm_fused/onnx.py)."""
import importlib.util
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstm_fused

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxscript onnxruntime)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")

NEEDS_ONNXSCRIPT = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None,
                                      reason="the dynamo exporter needs onnxscript (pip install onnxscript)")
EXPORTERS = [pytest.param(True, id="dynamo", marks=NEEDS_ONNXSCRIPT), pytest.param(False, id="legacy")]

# (cell, constructor arguments, whether the model passes initial states). Between them: one and
# two layers, both directions, batch_first, no bias, projections, with and without states.
VARIANTS = {
    "lstm": ("LSTM", dict(num_layers=1), False),
    "lstm-2layers-bi-batchfirst-states": ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), True),
    "lstm-nobias-bi-states": ("LSTM", dict(bias=False, bidirectional=True), True),
    "lstm-proj-nobias": ("LSTM", dict(proj_size=3, bias=False), False),
    "lstm-proj-2layers-bi-batchfirst-states": ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True,
                                                            proj_size=5), True),
    "gru": ("GRU", dict(num_layers=1), False),
    "gru-2layers-bi-batchfirst-states": ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True), True),
    "gru-nobias-bi-states": ("GRU", dict(bias=False, bidirectional=True), True),
}

INPUT, HIDDEN, T, B = 5, 7, 6, 3


class Model(nn.Module):
    """A recurrent layer and a linear head, as users put them together."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        out = (rnn.proj_size or rnn.hidden_size) * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(out, 2)

    def forward(self, x, *states):
        if not states:
            y, final = self.rnn(x)
        else:
            y, final = self.rnn(x, states if len(states) == 2 else states[0])
        return (self.head(y), *(final if isinstance(final, tuple) else (final,)))


def make_model(cell, kwargs, seed):
    torch.manual_seed(seed)
    return Model(getattr(lstm_fused, cell)(INPUT, HIDDEN, **kwargs)).eval()


def make_inputs(model, with_states, generator, batch=B, steps=T, batched=True):
    rnn = model.rnn
    shape = (batch, steps, INPUT) if rnn.batch_first else (steps, batch, INPUT)
    if not batched:
        shape = (steps, INPUT)
    x = torch.randn(shape, generator=generator)
    if not with_states:
        return (x,)
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    lead = (layers, batch) if batched else (layers,)
    h0 = torch.randn(*lead, rnn.proj_size or rnn.hidden_size, generator=generator)
    if rnn.mode == "GRU":
        return x, h0
    return x, h0, torch.randn(*lead, rnn.hidden_size, generator=generator)


def export(model, inputs, path, dynamo, **kwargs):
    names = [f"input_{i}" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation, torch's tracer warnings
        torch.onnx.export(model, inputs, str(path), dynamo=dynamo, input_names=names, verbose=False, **kwargs)
    onnx.checker.check_model(str(path), full_check=True)  # a valid model, shapes inferred through
    return names


def run_onnx(path, names, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(out) for out in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def assert_matches_eager(model, path, names, inputs):
    with torch.no_grad():
        expected = model(*inputs)
    got = run_onnx(path, names, inputs)
    assert len(got) == len(expected)
    for out, ref in zip(got, expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def op_types(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_runs_in_onnxruntime_as_eager(variant, dynamo, tmp_path):
    cell, kwargs, with_states = VARIANTS[variant]
    model = make_model(cell, kwargs, seed=len(variant))
    generator = torch.Generator().manual_seed(1000 + len(variant))
    path = tmp_path / "model.onnx"
    names = export(model, make_inputs(model, with_states, generator), path, dynamo)
    assert_matches_eager(model, path, names, make_inputs(model, with_states, generator))

    # ONNX's own node, one per layer (both directions in one), as nn.LSTM / nn.GRU export; with a
    # projection the same, its product after the node.
    nodes = op_types(path)
    layers = kwargs.get("num_layers", 1)
    assert nodes.count(cell) == layers and not {"Scan", "Loop"} & set(nodes)
    computing = [node for node in nodes if node != "Constant"]
    assert len(computing) < 45 * layers, computing  # a loop unrolled over the T steps would be far more


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_export_of_unbatched_input(cell, dynamo, tmp_path):
    model = make_model(cell, dict(bidirectional=True), seed=3)
    generator = torch.Generator().manual_seed(4)
    path = tmp_path / "model.onnx"
    names = export(model, make_inputs(model, True, generator, batched=False), path, dynamo)
    assert_matches_eager(model, path, names, make_inputs(model, True, generator, batched=False))


DYNAMIC = {
    "lstm-2layers-bi": ("LSTM", dict(num_layers=2, bidirectional=True)),
    "lstm-proj-bi-batchfirst": ("LSTM", dict(bidirectional=True, batch_first=True, proj_size=4)),
    "gru-2layers": ("GRU", dict(num_layers=2)),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("variant", list(DYNAMIC))
def test_export_with_dynamic_axes_runs_other_lengths_and_batches(variant, dynamo, tmp_path):
    """With the sequence and batch dimensions dynamic, the model runs other lengths and batch
    sizes than the traced ones. (nn.LSTM / nn.GRU cannot do this in the dynamo exporter of
    torch 2.14: its aten::lstm fixes the sequence length.)"""
    cell, kwargs = DYNAMIC[variant]
    model = make_model(cell, kwargs, seed=5)
    generator = torch.Generator().manual_seed(6)
    path = tmp_path / "model.onnx"
    axes = {0: "batch", 1: "steps"} if kwargs.get("batch_first") else {0: "steps", 1: "batch"}
    names = export(model, make_inputs(model, False, generator), path, dynamo, dynamic_axes={"input_0": axes})
    assert_matches_eager(model, path, names, make_inputs(model, False, generator, batch=2, steps=9))
    assert_matches_eager(model, path, names, make_inputs(model, False, generator, batch=5, steps=1))


class PackedModel(nn.Module):
    """Variable-length sequences as users feed them: pack inside the model."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths, *states):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, final = self.rnn(packed, (states if len(states) == 2 else states[0]) if states else None)
        return (pad_packed_sequence(y, total_length=x.shape[0])[0], *(final if isinstance(final, tuple) else (final,)))


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_legacy_export_of_packed_input_uses_sequence_lengths(cell, tmp_path):
    """As nn.LSTM / nn.GRU: the legacy exporter writes the lengths into ONNX's node; the initial
    states follow the caller's (unsorted) batch order."""
    torch.manual_seed(7)
    model = PackedModel(getattr(lstm_fused, cell)(INPUT, HIDDEN, num_layers=2, bidirectional=True)).eval()
    generator = torch.Generator().manual_seed(8)

    def inputs(lengths):
        states = [torch.randn(4, B, HIDDEN, generator=generator) for _ in range(2 if cell == "LSTM" else 1)]
        return (torch.randn(T, B, INPUT, generator=generator), torch.tensor(lengths), *states)

    path = tmp_path / "model.onnx"
    names = export(model, inputs([4, T, 2]), path, False)
    assert op_types(path).count(cell) == 2
    assert_matches_eager(model, path, names, inputs([2, 5, T]))  # other lengths than the traced ones


@NEEDS_ONNXSCRIPT
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_dynamo_export_of_packed_input_fails_plainly(cell, tmp_path):
    model = PackedModel(getattr(lstm_fused, cell)(INPUT, HIDDEN)).eval()
    inputs = (torch.randn(T, B, INPUT), torch.tensor([4, T, 2]))
    with pytest.raises(torch.onnx.OnnxExporterError) as error:
        export(model, inputs, tmp_path / "model.onnx", True)
    assert f"lstm_fused.{cell}: ONNX export of a PackedSequence input is not supported" in str(error.value)
    assert isinstance(error.value.__cause__, NotImplementedError)


def test_legacy_export_of_packed_projected_lstm_fails_plainly(tmp_path):
    """nn.LSTM with a projection cannot be exported by this exporter at all."""
    model = PackedModel(lstm_fused.LSTM(INPUT, HIDDEN, proj_size=3)).eval()
    with pytest.raises(NotImplementedError, match="packed input of an LSTM with proj_size > 0"):
        export(model, (torch.randn(T, B, INPUT), torch.tensor([4, T, 2])), tmp_path / "model.onnx", False)


class RecordsExporting(nn.Module):
    """Records lstm_fused's cheap export flag beside torch's public one at each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append((lstm_fused.onnx.is_exporting(), torch.onnx.is_in_onnx_export()))
        return self.inner(x)


def test_export_leaves_the_fused_path_on(tmp_path):
    """The export-time path is only taken while exporting (lstm_fused.onnx.is_exporting agrees
    with torch.onnx.is_in_onnx_export): afterwards the module runs the fused ops again
    (torch.export, for one, still sees them)."""
    model = RecordsExporting(make_model("LSTM", dict(num_layers=1), seed=9))
    inputs = make_inputs(model.inner, False, torch.Generator().manual_seed(10))
    export(model, inputs, tmp_path / "model.onnx", False)
    model(*inputs)
    assert model.seen[0] == (True, True) and model.seen[-1] == (False, False)
    graph = torch.export.export(model.inner, inputs).graph_module.code
    assert "lstm_fused.lstm_layer" in graph and "aten.lstm" not in graph


class CellModel(nn.Module):
    """A decoder-style step: one cell call and a linear head."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.head = nn.Linear(cell.hidden_size, 2)

    def forward(self, x, *state):
        out = self.cell(x, (state if len(state) == 2 else state[0]) if state else None)
        h = out[0] if isinstance(out, tuple) else out
        return (self.head(h), *(out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("bias,with_states", [(True, True), (False, False)])
def test_cells_export_runs_in_onnxruntime_as_eager(cell, bias, with_states, dynamo, tmp_path):
    torch.manual_seed(3)
    model = CellModel(getattr(lstm_fused, cell)(INPUT, HIDDEN, bias=bias)).eval()
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(B, INPUT, generator=gen)]
    if with_states:
        inputs += [torch.randn(B, HIDDEN, generator=gen) for _ in range(2 if cell == "LSTMCell" else 1)]
    path = tmp_path / "cell.onnx"
    names = export(model, tuple(inputs), path, dynamo)
    assert not any(op.startswith("lstm_fused") for op in op_types(path))
    assert_matches_eager(model, path, names, inputs)


# --- A program exported with torch.export first, holding the fused ops ----------------------------

@NEEDS_ONNXSCRIPT
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_program_runs_in_onnxruntime_as_eager(variant, tmp_path):
    """torch.onnx.export of an ExportedProgram (the fused ops in its graph, since torch.export
    traced the module outside any ONNX export) gives the same ONNX nodes as exporting the module."""
    cell, kwargs, with_states = VARIANTS[variant]
    model = make_model(cell, kwargs, seed=20 + len(variant))
    generator = torch.Generator().manual_seed(2000 + len(variant))
    inputs = make_inputs(model, with_states, generator)
    program = torch.export.export(model, inputs)
    assert "lstm_fused." in program.graph_module.code
    path = tmp_path / "program.onnx"
    names = export(program, inputs, path, True)
    assert_matches_eager(model, path, names, make_inputs(model, with_states, generator))
    nodes = op_types(path)
    directions = 2 if kwargs.get("bidirectional") else 1
    assert nodes.count(cell) == kwargs.get("num_layers", 1) * directions  # one node per direction
    assert not any(op.startswith("lstm_fused") for op in nodes) and not {"Scan", "Loop"} & set(nodes)


@NEEDS_ONNXSCRIPT
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_exported_training_program_with_dynamic_dims_runs_other_lengths(cell, tmp_path):
    """A module in training mode (torch.export records the forward op, the one with a reserve)
    exported with dynamic length and batch runs other lengths and batches (dropout 0)."""
    kwargs = dict(num_layers=2, bidirectional=True) if cell == "GRU" else dict(num_layers=2, proj_size=4)
    model = make_model(cell, kwargs, seed=11).train()
    generator = torch.Generator().manual_seed(12)
    inputs = make_inputs(model, False, generator)
    dims = ({0: torch.export.Dim("steps"), 1: torch.export.Dim("batch")},)
    program = torch.export.export(model, inputs, dynamic_shapes=dims)
    assert f"lstm_fused.{cell.lower()}_layer_forward" in program.graph_module.code
    path = tmp_path / "program.onnx"
    names = export(program, inputs, path, True)
    model.eval()
    assert_matches_eager(model, path, names, make_inputs(model, False, generator, batch=2, steps=9))
    assert_matches_eager(model, path, names, make_inputs(model, False, generator, batch=5, steps=1))


@NEEDS_ONNXSCRIPT
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_exported_program_of_a_cell_runs_in_onnxruntime_as_eager(cell, tmp_path):
    torch.manual_seed(13)
    model = CellModel(getattr(lstm_fused, cell)(INPUT, HIDDEN)).eval()
    gen = torch.Generator().manual_seed(14)
    inputs = (torch.randn(B, INPUT, generator=gen),)
    path = tmp_path / "cell.onnx"
    names = export(torch.export.export(model, inputs), inputs, path, True)
    assert cell[:-4] in op_types(path)
    assert_matches_eager(model, path, names, (torch.randn(B, INPUT, generator=gen),))


class LayerWithLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = lstm_fused.LSTM(INPUT, HIDDEN)

    def forward(self, x, lengths):
        h0 = x.new_zeros(x.size(1), HIDDEN)
        rnn = self.rnn
        return lstm_fused.lstm_layer(x, h0, h0, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0,
                                     lengths=lengths)[0]


@NEEDS_ONNXSCRIPT
def test_exported_program_with_lengths_fails_plainly(tmp_path):
    inputs = (torch.randn(T, B, INPUT), torch.tensor([T, 4, 2]))
    program = torch.export.export(LayerWithLengths().eval(), inputs)
    with pytest.raises(Exception) as failure:
        export(program, inputs, tmp_path / "model.onnx", True)
    causes = []
    error = failure.value
    while error is not None:
        causes.append(error)
        error = error.__cause__
    assert any(isinstance(e, NotImplementedError) and "per-row lengths" in str(e) for e in causes), causes


def test_export_decompositions_decline_outside_an_onnx_export():
    """The entries in torch's global decomposition table (lstm_fused/onnx.py) write ONNX nodes only
    during an ONNX export: on real tensors elsewhere they decline, on fake ones they are the fake
    kernel (and torch.compile with dynamic shapes still runs the fused op: test_contract)."""
    gen = torch.Generator().manual_seed(15)
    x, h0 = torch.randn(T, B, INPUT, generator=gen), torch.randn(B, HIDDEN, generator=gen)
    w_ih, w_hh = torch.randn(4 * HIDDEN, INPUT, generator=gen), torch.randn(4 * HIDDEN, HIDDEN, generator=gen)
    entry = torch._decomp.decomposition_table[torch.ops.lstm_fused.lstm_layer_inference.default]
    assert entry(x, h0, h0, w_ih, w_hh, None, None, None, None, False) is NotImplemented
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, h0, h0, w_ih, w_hh)]
        y, h_n, c_n = entry(*fakes, None, None, None, None, False)
    assert y.shape == (T, B, HIDDEN) and h_n.shape == c_n.shape == (B, HIDDEN)
    assert torch._subclasses.fake_tensor.is_fake(y)


@NEEDS_ONNXSCRIPT
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_program_exported_under_no_grad_holds_the_inference_ops_and_exports(cell, tmp_path):
    model = make_model(cell, dict(bidirectional=True, num_layers=2), seed=16)
    generator = torch.Generator().manual_seed(17)
    inputs = make_inputs(model, True, generator)
    with torch.no_grad():
        program = torch.export.export(model, inputs)
    assert f"lstm_fused.{cell.lower()}_layer_inference" in program.graph_module.code
    path = tmp_path / "program.onnx"
    names = export(program, inputs, path, True)
    assert_matches_eager(model, path, names, make_inputs(model, True, generator))
    assert op_types(path).count(cell) == 4
