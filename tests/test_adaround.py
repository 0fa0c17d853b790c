"""AdaRound (QuantConfig(method="adaround")): the rectified sigmoid and its schedule, layer-wise
rounding against the layer objective, block-wise reconstruction (BRECQ) on BERT and Llama."""
import pytest
import torch

from int4kit import Int4Linear, QuantConfig, quantize_model
from int4kit.quant import adaround as ar
from int4kit.quant.blocks import find_blocks
from int4kit.quant.gptq import damped
from int4kit.quant.rtn import dequant, layer_objective, rtn

from test_quant_model import bert_batches, tiny_bert


def correlated_layer(N=24, K=64, tokens=512, seed=0):
    """A weight and the Hessian of strongly correlated inputs, where rounding each weight to
    nearest is far from the best joint choice."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    x = torch.randn(tokens, K, generator=g) @ mix
    return w, (x.T @ x / tokens).double()


def test_rectified_sigmoid_and_beta_schedule():
    v = torch.linspace(-20, 20, 101)
    h = ar.rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1 and torch.all(h[1:] >= h[:-1])
    assert ar.rectified_sigmoid(torch.zeros(1)) == 0.5
    assert ar.beta_at(0, 100, 0.2) is None and ar.beta_at(19, 100, 0.2) is None
    assert ar.beta_at(20, 100, 0.2) == 20.0
    assert abs(ar.beta_at(100, 100, 0.2) - 2.0) < 1e-9
    assert 2.0 < ar.beta_at(60, 100, 0.2) < 20.0


def test_soft_rounding_starts_at_the_dense_weight_and_ends_at_floor_or_ceil():
    w, H = correlated_layer()
    _, s, z = rtn(w, 32, False)
    soft = ar.SoftRounding(w, s, z, 32)
    se = s.repeat_interleave(32, 1)
    exact = w / se + z.repeat_interleave(32, 1)
    inside = (exact >= 0) & (exact <= 15)  # outside, the code clamps (z is rounded)
    assert inside.float().mean() > 0.95
    # h(V0) = frac(w / s) up to the 1e-4 clamp of the logit's argument
    assert ((soft.soft_weight() - w).abs() <= 2e-4 * se + 1e-7)[inside].all()
    codes = soft.codes().float()
    assert ((codes - exact).abs() < 1)[inside].all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_layerwise_adaround_beats_nearest_on_the_layer_objective(symmetric):
    w, H = correlated_layer()
    nearest, s, z = rtn(w, 32, symmetric, clip_search=True,
                        channel_weight=torch.diagonal(H).float())
    codes, s2, z2 = ar.adaround(w, H, 32, symmetric, torch.float32, iters=400)
    assert torch.equal(s, s2) and torch.equal(z, z2)  # the grid is round-to-nearest's
    base = layer_objective(w, dequant(nearest, s, z, 32), H)
    learned = layer_objective(w, dequant(codes, s, z, 32), H)
    assert learned < 0.8 * base
    assert 0 <= int(codes.min()) and int(codes.max()) <= 15
    again = ar.adaround(w, H, 32, symmetric, torch.float32, iters=400)[0]
    assert torch.equal(codes, again)  # deterministic


def test_polishing_ends_at_a_local_minimum_below_the_learned_rounding():
    from test_descent import move_gains
    w, H = correlated_layer(seed=5)
    learned, s, z = ar.adaround(w, H, 32, False, torch.float32, iters=300)
    polished, s2, z2 = ar.adaround(w, H, 32, False, torch.float32, iters=300, polish_sweeps=50)
    assert torch.equal(s, s2) and torch.equal(z, z2)
    before = layer_objective(w, dequant(learned, s, z, 32), H)
    assert layer_objective(w, dequant(polished, s, z, 32), H) < before
    up, down, size = move_gains(w, polished, s, z, 32, H)
    assert bool((torch.minimum(up, down) >= -1e-3 * size - 1e-9 * before).all())
    # some codes left the floor / ceiling pair the learned rounding chooses from
    exact = w / s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    assert bool(((polished < exact.floor()) | (polished > exact.floor() + 1)).any())


def test_damping_is_the_ridge_on_the_hessian_diagonal():
    w, H = correlated_layer(seed=6)
    Hd = H.clone()
    Hd.diagonal().add_(0.3 * float(torch.diagonal(H).mean()))
    for polish in (0, 20):  # without the clipping search the grid does not read H
        with_damp = ar.adaround(w, H, 32, True, torch.float32, iters=200, clip_search=False,
                                damp=0.3, polish_sweeps=polish)
        ridge = ar.adaround(w, Hd, 32, True, torch.float32, iters=200, clip_search=False,
                            polish_sweeps=polish)
        assert all(torch.equal(a, b) for a, b in zip(with_damp, ridge))
    assert damped(H, 0.0) is H


def test_refine_rounds_refit_the_grid_and_lower_the_objective():
    w, H = correlated_layer(seed=7)
    codes, s, z = ar.adaround(w, H, 32, False, torch.float32, iters=300, polish_sweeps=20)
    refined, s2, z2 = ar.adaround(w, H, 32, False, torch.float32, iters=300, polish_sweeps=20,
                                  refine_rounds=2)
    assert not torch.equal(s, s2) and not torch.equal(z2, torch.round(z2))  # fractional z
    assert layer_objective(w, dequant(refined, s2, z2, 32), H) < \
        layer_objective(w, dequant(codes, s, z, 32), H)
    assert 0 <= int(refined.min()) and int(refined.max()) <= 15


def test_regulariser_drives_every_rounding_to_a_decision():
    w, H = correlated_layer(seed=1)
    nearest, s, z = rtn(w, 32, False)
    base = layer_objective(w, dequant(nearest, s, z, 32), H)
    soft = ar.SoftRounding(w, s, z, 32)
    opt = torch.optim.Adam([soft.v], lr=3e-2)
    for step in range(1000):
        d = w - soft.soft_weight()
        loss = ((d @ H.float()) * d).sum() / base
        beta = ar.beta_at(step, 1000, 0.2)
        if beta is not None:
            loss = loss + 10 * soft.regulariser(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = ar.rectified_sigmoid(soft.v.detach())
    undecided = ((h > 0.01) & (h < 0.99)).float().mean()
    assert undecided < 0.05


def test_block_discovery():
    model = tiny_bert()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    blocks, loose = find_blocks(model, names)
    assert [b for b, _ in blocks] == ["encoder.layer.0", "encoder.layer.1"]
    assert len(blocks[0][1]) == 6 and loose == ["pooler.dense"]


def block_error(fp, model, batches):
    with torch.no_grad():
        return sum(float(((model(**b).last_hidden_state - fp(**b).last_hidden_state) ** 2).mean())
                   for b in batches)


@pytest.mark.parametrize("reconstruction, refine_rounds", [("layer", 0), ("layer", 2),
                                                            ("block", 0), ("block", 2)])
def test_adaround_quantizes_bert_better_than_its_grid_rounded(reconstruction, refine_rounds):
    calib = bert_batches(n=4)
    fp = tiny_bert()
    nearest = tiny_bert()
    quantize_model(nearest, QuantConfig(group_size=32, symmetric=False, clip_search=True))
    model = tiny_bert()
    config = QuantConfig(group_size=32, symmetric=False, method="adaround", clip_search=True,
                         adaround_iters=200, reconstruction=reconstruction,
                         refine_rounds=refine_rounds)
    report = quantize_model(model, config, calib)
    assert len(report.swapped) == 13
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in report.swapped)
    assert block_error(fp, model, calib) < 0.8 * block_error(fp, nearest, calib)
    if refine_rounds:  # refitted grids: fractional zero points, stored as such
        zeros = [model.get_submodule(n).canonical()[2] for n in report.swapped]
        assert any(not torch.equal(z, torch.round(z)) for z in zeros)
    if reconstruction == "block":  # reproducible with the seed
        again = tiny_bert()
        quantize_model(again, config, calib)
        for n in report.swapped:
            assert torch.equal(again.get_submodule(n).canonical()[0],
                               model.get_submodule(n).canonical()[0]), n


def test_block_layer_weight_lowers_the_layers_own_objectives():
    """adaround_layer_weight adds each layer's damped objective to the block loss: the first
    block's query / key / value (whose inputs, the embeddings, no quantization changes) end
    nearer their own optimum with it than with the block loss alone."""
    calib = bert_batches(n=4)
    fp = tiny_bert()
    inputs = []
    hook = fp.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in calib:
            fp(**batch)
    hook.remove()
    x = torch.cat(inputs).double()
    H = damped(x.T @ x / x.shape[0], 0.2)
    objectives = {}
    for weight in (0.0, 5.0):
        model = tiny_bert()
        quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="adaround",
                                          adaround_iters=200, adaround_polish_sweeps=0,
                                          reconstruction="block", adaround_layer_weight=weight),
                       calib)
        total = 0.0
        for name in ("query", "key", "value"):
            dense = getattr(fp.encoder.layer[0].attention.self, name).weight.detach().double()
            quantized = getattr(model.encoder.layer[0].attention.self, name)
            total += float(layer_objective(dense, quantized.to_linear(torch.float32).weight
                                           .detach().double(), H))
        objectives[weight] = total
    assert objectives[5.0] < 0.9 * objectives[0.0], objectives


def test_block_reconstruction_on_a_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    fp = transformers.LlamaForCausalLM(config).eval()
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(fp.state_dict())
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for _ in range(3)]
    report = quantize_model(model, QuantConfig(group_size=32, symmetric=False, method="adaround",
                                               adaround_iters=50, reconstruction="block"),
                            calib, skip=["lm_head"])
    assert len(report.swapped) == 14
    with torch.no_grad():
        rel = (model(**calib[0]).logits - fp(**calib[0]).logits).norm() / \
            fp(**calib[0]).logits.norm()
    assert rel < 0.2


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="gptq", reconstruction="block"), "applies to method 'adaround'"),
    (dict(method="adaround", reconstruction="model"), "reconstruction must be 'layer' or 'block'"),
    (dict(method="adaround", adaround_iters=-1), "adaround_iters must be a non-negative int"),
    (dict(method="adaround", adaround_polish_sweeps=1.5),
     "adaround_polish_sweeps must be a non-negative int"),
    (dict(method="adaround", adaround_lr=0), "adaround_lr must be a positive number"),
    (dict(method="adaround", adaround_reg=float("nan")), "adaround_reg must be a non-negative"),
    (dict(method="adaround", seed=-2), "seed must be a non-negative int"),
    (dict(method="adaround", adaround_layer_weight=-1),
     "adaround_layer_weight must be a non-negative number"),
])
def test_bad_adaround_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_adaround_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize_model(tiny_bert(), QuantConfig(group_size=32, method="adaround"))
