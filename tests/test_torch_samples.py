"""PyTorch's own module samples and error samples for nn.LSTM, LSTMCell, GRU and GRUCell (from
torch.testing._internal.common_modules), run against our classes with torch.nn's weights."""
import functools

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import lstm_fused

# common_modules imports expecttest, a test-only dependency of torch's own suite.
cm = pytest.importorskip("torch.testing._internal.common_modules",
                         reason="torch's test samples need the expecttest package")

PAIRS = {nn.LSTM: lstm_fused.LSTM, nn.LSTMCell: lstm_fused.LSTMCell,
         nn.GRU: lstm_fused.GRU, nn.GRUCell: lstm_fused.GRUCell}


def _sample_outputs_and_grads(module, sample):
    args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
    outputs = [t for t in tree_flatten(module(*args, **kwargs))[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves += list(module.parameters())
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
    return outputs, torch.autograd.grad(loss, leaves)


SAMPLES = {
    "LSTM": (nn.LSTM, cm.module_inputs_torch_nn_LSTM),
    "LSTMCell": (nn.LSTMCell, cm.module_inputs_torch_nn_LSTMCell),
    "GRU": (nn.GRU, functools.partial(cm.module_inputs_torch_nn_RNN_GRU, is_rnn=False)),
    "GRU-packed": (nn.GRU, functools.partial(cm.module_inputs_torch_nn_RNN_GRU, is_rnn=False,
                                              with_packed_sequence=True)),
    "GRUCell": (nn.GRUCell, cm.module_inputs_torch_nn_RNN_GRU_Cell),
}


@pytest.mark.parametrize("torch_class,make_samples", list(SAMPLES.values()), ids=list(SAMPLES))
@pytest.mark.parametrize("training", [True, False])
def test_pytorch_module_samples(torch_class, make_samples, training):
    samples = make_samples(None, "cpu", torch.float64, requires_grad=True, training=training)
    assert len(samples) > 0
    for sample in samples:
        c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ref = torch_class(*c_args, **c_kwargs).double().train(training)
        ours = PAIRS[torch_class](*c_args, **c_kwargs).double().train(training)
        ours.load_state_dict(ref.state_dict())
        outs_ref, grads_ref = _sample_outputs_and_grads(ref, sample)
        outs, grads = _sample_outputs_and_grads(ours, sample)
        assert len(outs) == len(outs_ref)
        for a, b in zip(outs + list(grads), outs_ref + list(grads_ref)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


ERROR_SAMPLES = {
    "LSTM": (nn.LSTM, cm.module_error_inputs_torch_nn_RNN_GRU),
    "LSTMCell": (nn.LSTMCell, cm.module_error_inputs_torch_nn_LSTMCell),
    "GRU": (nn.GRU, cm.module_error_inputs_torch_nn_RNN_GRU),
    "GRUCell": (nn.GRUCell, cm.module_error_inputs_torch_nn_RNN_GRU_Cell),
}


@pytest.mark.parametrize("torch_class,make_errors", list(ERROR_SAMPLES.values()), ids=list(ERROR_SAMPLES))
def test_pytorch_module_error_samples(torch_class, make_errors):
    errors = make_errors(None, "cpu", torch.float32, requires_grad=False, training=True)
    assert len(errors) > 0
    for error in errors:
        sample = error.module_error_input
        c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        for cls in (torch_class, PAIRS[torch_class]):
            with pytest.raises(error.error_type):
                module = cls(*c_args, **c_kwargs)
                module(*sample.forward_input.args, **sample.forward_input.kwargs)



LAYER_ERROR_SAMPLES = {"LSTM": nn.LSTM, "GRU": nn.GRU}


@pytest.mark.parametrize("torch_class", list(LAYER_ERROR_SAMPLES.values()), ids=list(LAYER_ERROR_SAMPLES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pytorch_error_sample_messages_of_the_layers(torch_class, dtype):
    """PyTorch's own error samples for nn.LSTM and nn.GRU (their input dtype among them): ours
    raises at the same stage (construction or forward), with the same type, and a message that
    matches the sample's regular expression, as torch.nn's does."""
    errors = cm.module_error_inputs_torch_nn_RNN_GRU(None, "cpu", dtype, requires_grad=False, training=True)
    assert any(error.error_on == cm.ModuleErrorEnum.FORWARD_ERROR for error in errors)
    for error in errors:
        sample = error.module_error_input
        c_args, c_kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        for cls in (torch_class, PAIRS[torch_class]):
            if error.error_on == cm.ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(error.error_type, match=error.error_regex):
                    cls(*c_args, **c_kwargs)
                continue
            module = cls(*c_args, **c_kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                module(*sample.forward_input.args, **sample.forward_input.kwargs)


def _error_of(call):
    try:
        call()
    except Exception as error:  # compared below
        return type(error), str(error)
    return None


@pytest.mark.parametrize("torch_class", list(LAYER_ERROR_SAMPLES.values()), ids=list(LAYER_ERROR_SAMPLES))
def test_layer_input_errors_are_torch_nns_word_for_word(torch_class):
    """The input checks are torch.nn's own: the same type and message for a wrong input dtype
    (also when functional_call swaps in weights of another dtype) or feature count."""
    ref = torch_class(3, 5)
    ours = PAIRS[torch_class](3, 5)
    ours.load_state_dict(ref.state_dict())
    double_weights = {name: p.double() for name, p in ref.named_parameters()}
    calls = [
        lambda m: m(torch.randn(2, 4, 3, dtype=torch.float64)),
        lambda m: m(torch.randn(2, 4, 3, dtype=torch.bfloat16)),
        lambda m: torch.func.functional_call(m, double_weights, (torch.randn(2, 4, 3),)),
        lambda m: m(torch.randn(2, 4, 7)),
    ]
    for call in calls:
        expected = _error_of(lambda: call(ref))
        assert expected is not None
        assert _error_of(lambda: call(ours)) == expected


CELL_ERROR_SAMPLES = {
    "LSTMCell": (nn.LSTMCell, getattr(cm, "module_error_inputs_torch_nn_LSTMCell", None)),
    "GRUCell": (nn.GRUCell, getattr(cm, "module_error_inputs_torch_nn_RNN_GRU_Cell", None)),
}


@pytest.mark.parametrize("torch_class,make_errors", list(CELL_ERROR_SAMPLES.values()), ids=list(CELL_ERROR_SAMPLES))
@pytest.mark.parametrize("grad", [False, True])
def test_pytorch_cell_error_samples_raise_torch_nns_messages(torch_class, make_errors, grad):
    """The cells' error samples of torch's module_db, message regexes included, in either grad mode
    (the short per-call path hands every refused call to the path that raises torch.nn's errors).
    torch's GRUCell list shares RNNCell's samples: those given a nonlinearity make it the bias
    argument of a GRUCell, as in torch's own run of them."""
    if make_errors is None:
        pytest.skip(f"this torch's common_modules has no error samples for {torch_class.__name__}")
    errors = make_errors(None, "cpu", torch.float32, requires_grad=False, training=True)
    assert len(errors) >= 4
    for error in errors:
        sample = error.module_error_input
        module = PAIRS[torch_class](*sample.constructor_input.args, **sample.constructor_input.kwargs)
        with torch.set_grad_enabled(grad), pytest.raises(error.error_type, match=error.error_regex):
            module(*sample.forward_input.args, **sample.forward_input.kwargs)
