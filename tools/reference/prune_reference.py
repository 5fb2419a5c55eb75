"""LLM-Pruner-equivalent structured pruning in torch, over HF transformers models.

This is the reference pare's `pare prune` is checked against. It follows LLM-Pruner's published
algorithm (horseee/LLM-Pruner: LLMPruner/pruner/hf_llama_pruner.py `TaylorImportance` and
`MagnitudeImportance`, torch_pruning/pruner/algorithms/metapruner.py `prune_local`, llama3.py /
hf_prune.py for the gradients), with the coupled groups written out instead of traced:

- attention, `kv-groups`: a KV head with the query heads that read it (k/v/q rows, o columns),
  scored in the root module's (k_proj's) channel space; `query-heads`: one query head (q rows,
  o columns), KV heads kept and every KV group losing the same number of query heads.
- MLP: one intermediate channel (gate/up rows, down column).
- per coupled tensor a per-channel local importance along its cut axis:
  magnitude Σ|w|^p; Taylor salience s = w·g (param_first, vectorize), w·F·w (param_second),
  w·g − ½ w·F·w (param_mix), reduced as Σ|s| (param_*) or |Σ s| (vectorize);
  Wanda-SP |w|·‖x‖. Query-channel contributions are added onto the KV channel they read
  (HF's repeat_kv: query head h reads KV head h // group). NOTE: LLM-Pruner aligns longer
  vectors with `view(len // min, min).sum(0)`, which would pair query head h with KV head
  h mod n_kv; we use HF's pairing, the one that keeps attention intact.
- reduction over the group's tensors per root channel (sum / mean / max), then the sum over a
  unit's consecutive root channels (MetaPruner's consecutive_groups).
- counts: of C root channels, C − int(C·(1 − ratio)) are pruned, in whole units; the lowest
  scores go (stable order on ties).
- g: gradient of the mean loss over the whole batch (one backward, as LLM-Pruner); F: mean of
  the squared per-sample gradients (LLM-Pruner's acc_grad loop). The loss's log-sum-exp runs in
  float64 (see `mean_loss`).
"""

import torch

ROLES_ATTN = {"kv-groups": [("k", "rows"), ("q", "rows"), ("v", "rows"), ("o", "cols")], "query-heads": [("q", "rows"), ("o", "cols")]}
ROLES_MLP = [("gate", "rows"), ("up", "rows"), ("down", "cols")]


def linear(layer, role):
    a, m = layer.self_attn, layer.mlp
    return {"q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj, "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj}[role]


def shape(model):
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, head_dim


def mean_loss(model, x):
    """HF's causal-LM loss (mean next-token cross-entropy over the batch), with the log-sum-exp in
    float64: torch's float32 cross_entropy over a 49k vocabulary is off by ~3e-6 relative, which
    moves Taylor scores by up to 2e-4 (measured on SmolLM2 against an all-float64 run)."""
    logits = model(x).logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def gradients(model, samples, variant, targets):
    """Mean-loss gradient G (one batch backward) and, for param_second / param_mix, the mean of
    squared per-sample gradients A, for the (layer, role) tensors in `targets`."""
    params = {t: linear(model.model.layers[t[0]], t[1]).weight for t in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    acc = {}
    if variant in ("param_second", "param_mix"):
        for ids in samples:
            model.zero_grad(set_to_none=True)
            x = torch.tensor([ids])
            mean_loss(model, x).backward()
            for t, p in params.items():
                sq = p.grad * p.grad / len(samples)
                acc[t] = acc[t] + sq if t in acc else sq.clone()
    model.zero_grad(set_to_none=True)
    x = torch.tensor(samples)
    loss = mean_loss(model, x)
    loss.backward()
    grads = {t: p.grad.detach().clone() for t, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return grads, acc, loss.item()


def input_norms(model, samples):
    """‖x_j‖ over all calibration tokens of the inputs of q_proj (= k, v), o_proj, gate_proj (= up), down_proj."""
    sums, hooks = {}, []
    for l, layer in enumerate(model.model.layers):
        for role in ("q", "o", "gate", "down"):
            def hook(_m, inp, l=l, role=role):
                x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                key = (l, role)
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
            hooks.append(linear(layer, role).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in samples:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def local_norm(method, w, axis, g=None, a=None, x=None):
    dim = 1 if axis == "rows" else 0
    w = w.detach().double()
    if method in ("l1", "l2"):
        return w.abs().pow(1 if method == "l1" else 2).sum(dim)
    if method == "wanda-sp":
        return (w.abs() * x[None, :]).sum(1) if axis == "rows" else w.abs().sum(0) * x
    g = g.double()
    if method == "param_second":
        s = w * a.double() * w
    elif method == "param_mix":
        s = w * g - 0.5 * w * a.double() * w
    else:
        s = w * g
    return s.sum(dim).abs() if method == "vectorize" else s.abs().sum(dim)


def to_root(v, role, mode, heads, kv, d):
    if mode == "kv-groups" and role in ("q", "o"):
        return v.view(kv, heads // kv, d).sum(1).flatten()
    return v


def reduce(stack, reduction):
    s = torch.stack(stack)
    return {"sum": s.sum(0), "mean": s.mean(0), "max": s.max(0).values}[reduction]


def scores(model, method, reduction, gqa, attn_layers, mlp_layers, samples=None):
    """Unit scores {attn: {layer: [...]}, mlp: {layer: [...]}} and the mean calibration loss."""
    heads, kv, d = shape(model)
    roles = ROLES_ATTN[gqa]
    targets = [(l, r) for l in attn_layers for r, _ in roles] + [(l, r) for l in mlp_layers for r, _ in ROLES_MLP]
    grads, acc, loss, xs = {}, {}, None, {}
    if method in ("param_first", "vectorize", "param_second", "param_mix"):
        grads, acc, loss = gradients(model, samples, method, targets)
    if method == "wanda-sp":
        xs = input_norms(model, samples)
    x_of = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}
    out = {"attn": {}, "mlp": {}}
    for kind, layers, members, width in (("attn", attn_layers, roles, d), ("mlp", mlp_layers, ROLES_MLP, 1)):
        for l in layers:
            stack = []
            for role, axis in members:
                w = linear(model.model.layers[l], role).weight
                v = local_norm(method, w, axis, grads.get((l, role)), acc.get((l, role)), xs.get((l, x_of[role])))
                stack.append(to_root(v, role, gqa, heads, kv, d) if kind == "attn" else v)
            out[kind][l] = reduce(stack, reduction).view(-1, width).sum(1)
    return out, loss


def pruned_units(units, root_width, ratio):
    channels = units * root_width
    return (channels - int(channels * (1 - ratio))) // root_width


def keep(scores_, remove):
    order = torch.argsort(scores_, stable=True)
    return sorted(order[remove:].tolist())


def plan(model, unit_scores, gqa, ratio):
    """Kept indices per layer under local pruning: {layer: {"attn": (heads, kv_heads), "mlp": channels}}."""
    heads, kv, d = shape(model)
    group = heads // kv
    out = {}
    for l, s in unit_scores["attn"].items():
        if gqa == "kv-groups":
            p = pruned_units(kv, d, ratio)
            kept_kv = keep(s, p)
            kept_heads = [k * group + i for k in kept_kv for i in range(group)]
        else:
            # Slot r: the r-th weakest query head of every KV group, scored by their sum.
            per_group = s.view(kv, group)
            slots = per_group.sort(1).values.sum(0)
            p = pruned_units(group, d, ratio)
            kept_kv = list(range(kv))
            kept_heads = [k * group + i for k in range(kv) for i in keep(per_group[k], p)]
            assert len(slots) == group
        if p:
            out.setdefault(l, {})["attn"] = (kept_heads, kept_kv)
    for l, s in unit_scores["mlp"].items():
        p = pruned_units(len(s), 1, ratio)
        if p:
            out.setdefault(l, {})["mlp"] = keep(s, p)
    return out


@torch.no_grad()
def apply(model, kept):
    """Slice the HF model in place; per-layer head counts are set on each attention module."""
    heads, kv, d = shape(model)
    for l, k in kept.items():
        layer = model.model.layers[l]
        if "attn" in k:
            kept_heads, kept_kv = k["attn"]
            q_rows = [h * d + i for h in kept_heads for i in range(d)]
            kv_rows = [h * d + i for h in kept_kv for i in range(d)]
            a = layer.self_attn
            for lin, rows in ((a.q_proj, q_rows), (a.k_proj, kv_rows), (a.v_proj, kv_rows)):
                lin.weight = torch.nn.Parameter(lin.weight[rows].clone())
                if lin.bias is not None:
                    lin.bias = torch.nn.Parameter(lin.bias[rows].clone())
                lin.out_features = len(rows)
            a.o_proj.weight = torch.nn.Parameter(a.o_proj.weight[:, q_rows].clone())
            a.o_proj.in_features = len(q_rows)
            a.num_key_value_groups = len(kept_heads) // len(kept_kv)
        if "mlp" in k:
            ch = k["mlp"]
            m = layer.mlp
            for lin in (m.gate_proj, m.up_proj):
                lin.weight = torch.nn.Parameter(lin.weight[ch].clone())
                lin.out_features = len(ch)
            m.down_proj.weight = torch.nn.Parameter(m.down_proj.weight[:, ch].clone())
            m.down_proj.in_features = len(ch)
    return model


def perplexity(model, ids, ctx):
    """pare eval ppl's windows with stride = ctx: each window scores its tokens but the first."""
    nll, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), ctx):
            chunk = ids[begin : begin + ctx]
            if len(chunk) < 2:
                break
            lp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].float(), -1)
            t = torch.tensor(chunk[1:])
            nll -= lp[:-1].gather(-1, t[:, None]).double().sum().item()
            scored += len(chunk) - 1
    return float(torch.exp(torch.tensor(nll / scored)))
