"""LLaVA-1.5-7B and -13B training steps on a CPU, without weights or compute: the real code at the real sizes.

    python tools/dry_run.py                       # 7B and 13B, stage 2, rank 0 of a simulated world of 8
    python tools/dry_run.py --model 7b --stage 1  # stage 1 (the projector alone trains)
    python tools/dry_run.py --load                # also rank 0's side of the weight broadcast

For each size, from the real backbones' configs (tools/real_configs/: Vicuna v1.5 says float16, as on the hub):
1. The model is built as train.build_model builds it (from_config(empty=True), prepare, shard, materialize), as rank
   0 of torch's fake process group (collectives are accepted and do nothing), except that the parameters are *fake*
   tensors (torch._subclasses.fake_tensor): shapes, dtypes and devices, no storage.
2. Two steps of train.py's own loop body run on it (global_counts, forward_backward, AdamW from make_optimizer): one
   on a micro-batch with an image (576 placeholders), one on a text-only micro-batch.
3. Every collective the steps issue is recorded at the dispatcher (FSDP2's all-gathers and reduce-scatters, the
   loop's all-reduces, DTensor's in clip_grad_norm_). On 8 real ranks these sequences must be the same whatever a
   rank's data, or the job hangs (NCCL) or aborts (gloo): the two steps are compared, and the exit status is 1 when
   they differ. The dtypes seen (shards, compute weights, gradients, AdamW state) are reported too.

What makes model.py's data-dependent parts pass is DryRunMode: a FakeTensorMode in which an op none of whose tensor
arguments is fake runs for real. The batch is passed in as ordinary tensors, so what is computed from the batch alone
(placeholder counts, label masks, supervised positions, token counts) has real values; what touches a parameter is
fake. It leans on private torch APIs (FakeTensorMode's dispatch, the fake process group): a dry run, not a test of
numerics.
"""

import argparse
import os
import resource
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------------------------------
# The mode: fake where a parameter is involved, real where only the batch is


class DryRunMode(FakeTensorMode):
    """FakeTensorMode with four extra rules, applied to every op before the fake implementation:

    1. An op whose tensor arguments are all ordinary tensors (not fake, not meta, not a subclass such as DTensor)
       runs for real: the batch and what is computed from it alone keep their values, as do the buffers train.py
       keeps real (rotary frequencies, CLIP's position ids) and AdamW's step counters.
    2. Factories (no tensor argument) make fake tensors, except arange, which runs for real: transformers branches on
       position ids (fake ones would look like packed sequences and cost a 4-D mask instead of SDPA's is_causal).
    3. Indexing a fake tensor with a real boolean mask (x[mask], and the index_put of its gradient) becomes indexing
       with mask.nonzero(), computed for real, so the output's shape is known.
    4. A number read back from a fake tensor (the loss, the gradient norm: .item()) has no value; it reads as 1.0,
       which passes the loop's finiteness check.
    An op that would write fake results into a real tensor raises instead of leaving stale values. Every collective
    (the c10d and _c10d_functional namespaces) is recorded as (op, numel of its larger side, dtype, phase).
    """

    INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
    REAL_FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
    COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
    NOT_COLLECTIVES = {"wait_tensor", "barrier", "monitored_barrier"}

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.collectives, self.phase = [], ""
        self._ops = {}  # op -> (is a collective, the arguments it writes), worked out once per op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.prim.device.default and isinstance(args[0], FakeTensor):
            return args[0].fake_device  # tensor.device, half of all calls: answered as FakeTensorMode would
        if func.namespace == "profiler":  # FSDP's record_function annotations: no tensors
            return func(*args, **kwargs)
        collective, writes = self._ops.get(func) or self._op_info(func)
        tensors = _tensors(args, kwargs)
        if collective:
            big = max(tensors, key=lambda t: t.numel())  # all-gather output, reduce-scatter input
            self.collectives.append((f"{func.namespace}.{func._opname}", big.numel(), big.dtype, self.phase))
        if func in self.REAL_FACTORIES or (tensors and all(_is_real(t) for t in tensors)):
            return func(*args, **kwargs)  # the mode is off while it dispatches: the real kernel runs
        if func is aten._local_scalar_dense.default:
            return 1.0 if args[0].is_floating_point() else 1
        if func in self.INDEX_OPS:
            args = (args[0], _integer_indices(args[1]), *args[2:])
        for i, name in writes:
            value = kwargs[name] if name in kwargs else args[i] if i < len(args) else None
            if any(_is_real(t) for t in _tensors((value,), {})):
                raise RuntimeError(f"dry run: {func} would write fake results into a real tensor")
        if any(_is_real(t) for t in tensors):  # converted here, not by FakeTensorMode: its cache then serves them
            args, kwargs = self._fake(args), dict(zip(kwargs, self._fake(kwargs.values())))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _op_info(self, func):
        collective = func.namespace in self.COLLECTIVE_NAMESPACES and func._opname not in self.NOT_COLLECTIVES
        writes = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                  if a.alias_info is not None and a.alias_info.is_write]
        self._ops[func] = collective, writes
        return self._ops[func]

    def _fake(self, values):
        """Real tensors among an op's arguments as fake ones of the same size, stride, dtype and device (cheaper than
        FakeTensorConverter, which rebuilds the view chain of each new real view: the rotary cos/sin of every layer).
        Aliasing is lost, which is harmless since no op may write into a real tensor."""
        def fake(x):
            if not _is_real(x):
                return x
            return super(DryRunMode, self).__torch_dispatch__(aten.empty_strided.default, (), (x.size(), x.stride()),
                                                              dict(dtype=x.dtype, device=x.device))

        return [type(v)(fake(x) for x in v) if isinstance(v, (list, tuple)) else fake(v) for v in values]


def _tensors(args, kwargs):
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _is_real(t):
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta  # a Parameter of a fake tensor is fake


def _integer_indices(indices):
    """Advanced indices with each real boolean mask replaced by its nonzero() positions (one index per dimension)."""
    out = []
    for index in indices:
        if index is not None and _is_real(index) and index.dtype in (torch.bool, torch.uint8):
            out.extend(index.nonzero().unbind(1))  # a real op: the mode is off while it dispatches
        else:
            out.append(index)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The model and the batches


def build(size, stage, mode, load=False):
    """train.build_model with fake parameters; with load, also its rank-0 half of the weight broadcast
    (set_model_state_dict(broadcast_from_rank0=True)) from a fake full state dict standing in for the weights."""
    import finetune
    import pretrain
    import train
    from model import LlavaModel
    from tools.memory import CLIP_L_336, LLMS

    recipe = finetune.STAGE_2 if stage == 2 else pretrain.STAGE_1
    cfg = train.TrainConfig(**{**recipe, "vision_tower": CLIP_L_336, "llm": LLMS[size]})
    model = train.empty_sharded_model(cfg)
    with mode:  # building inside the mode fails (to_empty cannot swap fake parameters in); materializing works
        train.materialize(model, torch.device("cpu"))
    if load:
        source = LlavaModel.from_config(cfg.model_config(), dtype=torch.float16, empty=True)  # as Vicuna is saved
        with mode:
            mode.phase = "load"
            source.to_empty(device=torch.device("cpu"))
            train.set_model_state_dict(model, source.state_dict(), options=train.StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            mode.phase = ""
    model.train()
    return model, cfg


def micro_batches(image_tokens, text_tokens, seed=0):
    """Two micro-batches of two samples, collated by data.collate from ordinary tensors (built outside the mode):
    one with an image sample (BOS, the placeholders, text) and a longer text-only one; one of two text-only samples.
    The second half of each sample's text is its supervised reply."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, collate

    g = torch.Generator().manual_seed(seed)

    def sample(n_text, image):
        text = torch.randint(2, 32000, (n_text,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((image_tokens if image else 0,), IMAGE_TOKEN_INDEX), text])
        labels = ids.clone()
        labels[: len(ids) - n_text // 2] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels,
                "pixel_values": torch.randn(1, 3, 336, 336, generator=g) if image else None}

    return {"image": collate([sample(text_tokens, True), sample(text_tokens + 40, False)], pad_id=0),
            "text-only": collate([sample(text_tokens + 20, False), sample(text_tokens - 10, False)], pad_id=0)}


def describe(t):
    """'DTensor(FakeTensor) torch.float32', 'Tensor torch.float32' and the like."""
    if isinstance(t, DTensor):
        return f"DTensor({type(t.to_local()).__name__}) {t.dtype}"
    return f"{type(t).__name__ if isinstance(t, FakeTensor) else 'Tensor'} {t.dtype}"


# ----------------------------------------------------------------------------------------------------------------------
# The dry run and its report


def dry_run(size, stage=2, world=8, text_tokens=100, load=False, steps=("image", "text-only")):
    """Build, run the steps (each one step of train.py's loop body on one micro-batch), compare their collectives.
    Needs the fake process group (tools.memory.fake_world). Returns what it found as a dict: steps[name] has the
    step's collectives [(op, numel, dtype, phase)], `difference` is None when all steps' (op, numel, dtype) agree."""
    import train

    start = time.perf_counter()
    mode = DryRunMode()
    model, cfg = build(size, stage, mode, load)
    params = dict(model.named_parameters())
    sharded = {n for n, p in params.items() if isinstance(p, DTensor)}
    trainable = [p for p in params.values() if p.requires_grad]
    optimizer, flops = train.make_optimizer(model, cfg), train.FlopCounter(model, cfg.train_llm)
    computes_with = {}  # the weight a few modules compute with (FSDP has unsharded it by then)
    for name, module in {"decoder layer q_proj": model.language_model.base_model.layers[0].self_attn.q_proj,
                         "lm_head": model.language_model.get_output_embeddings(),
                         "projector": model.multi_modal_projector.linear_1,
                         "vision tower": model.vision_tower.embeddings.patch_embedding}.items():
        module.register_forward_pre_hook(lambda m, a, name=name: computes_with.update({name: describe(m.weight)}))
    model.register_forward_pre_hook(lambda *a: setattr(mode, "phase", "forward"), prepend=True)  # before FSDP's
    model.register_forward_hook(lambda *a: setattr(mode, "phase", "backward"))  # the loss is computed in forward
    results = {}
    batches = micro_batches(model.num_image_tokens, text_tokens)
    with mode:
        for name in steps:
            first, t0 = len(mode.collectives), time.perf_counter()
            mode.phase = "counts"
            n_supervised = train.global_counts([batches[name]], flops, torch.device("cpu"))["supervised_tokens"]
            loss, grad_norm = train.forward_backward(model, [batches[name]], n_supervised, trainable, cfg.grad_clip,
                                                     torch.device("cpu"))
            mode.phase = "optimizer"
            gradients = sorted({describe(p.grad) for p in trainable if p.grad is not None})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            results[name] = dict(collectives=mode.collectives[first:], supervised_tokens=int(n_supervised),
                                 seq_len=batches[name]["input_ids"].shape[1], gradients=gradients,
                                 seconds=time.perf_counter() - t0)

    def count(names, local=False):
        return sum((params[n].to_local() if local else params[n]).numel() for n in names)

    return dict(size=size, stage=stage, world=world, total_params=count(params),
                trainable_params=sum(p.numel() for p in trainable), sharded_params=count(sharded),
                local_params=count(sharded, local=True), replicated_params=count(params.keys() - sharded),
                sharded_dtypes=sorted({describe(params[n]) for n in sharded}),
                replicated_dtypes=sorted({describe(params[n]) for n in params.keys() - sharded}),
                computes_with=computes_with,
                optimizer_state=sorted({f"{k}: {describe(v)}" for s in optimizer.state.values() for k, v in s.items()}),
                load_collectives=[c for c in mode.collectives if c[3] == "load"], steps=results,
                difference=first_difference({name: [c[:3] for c in r["collectives"]] for name, r in results.items()}),
                seconds=time.perf_counter() - start)


def first_difference(sequences):
    """None when every step's (op, numel, dtype) sequence equals the first step's, else where one first differs."""
    (first_name, first), *others = sequences.items()
    for name, seq in others:
        for i, (a, b) in enumerate(zip(first, seq)):
            if a != b:
                return f"collective #{i}: {a} in the {first_name} step, {b} in the {name} step"
        if len(seq) != len(first):
            return f"{len(first)} collectives in the {first_name} step, {len(seq)} in the {name} step"
    return None


def summarize(records):
    """One line per (phase, op, dtype): how many, and their total numel."""
    count, total = Counter(), Counter()
    for op, numel, dtype, phase in records:
        count[phase, op, dtype] += 1
        total[phase, op, dtype] += numel
    return [f"{phase:<9} {op:<30} {str(dtype):<15} x{count[k]:<4} {total[k] / 1e6:10.1f}M elements"
            for k in count for phase, op, dtype in [k]]


def report(r):
    print(f"\n=== LLaVA-1.5-{r['size'].upper()}, stage {r['stage']}, rank 0 of a simulated world of {r['world']} ===")
    print(f"parameters {r['total_params'] / 1e9:.3f}B, {r['trainable_params'] / 1e9:.3f}B trainable; this rank holds "
          f"{r['local_params'] / 1e6:.1f}M of the {r['sharded_params'] / 1e6:.1f}M sharded ones and all "
          f"{r['replicated_params'] / 1e6:.1f}M of the replicated tower")
    print(f"  sharded parameters      {', '.join(r['sharded_dtypes'])}")
    print(f"  replicated parameters   {', '.join(r['replicated_dtypes'])}")
    for name, d in r["computes_with"].items():
        print(f"  computes with           {d}  ({name})")
    print(f"  AdamW state             {', '.join(r['optimizer_state'])}")
    if r["load_collectives"]:
        print("rank 0's side of the weight broadcast:")
        print("\n".join("    " + line for line in summarize(r["load_collectives"])))
    for name, s in r["steps"].items():
        print(f"step on the {name} micro-batch (T = {s['seq_len']}, {s['supervised_tokens']} supervised tokens, "
              f"counted for real): gradients {', '.join(s['gradients'])}; {s['seconds']:.1f} s; "
              f"{len(s['collectives'])} collectives:")
        print("\n".join("    " + line for line in summarize(s["collectives"])))
    if len(r["steps"]) > 1:
        print("collectives of the steps: " + ("IDENTICAL" if r["difference"] is None else
                                              f"DIFFERENT, first at {r['difference']}"))
    print(f"{r['seconds']:.1f} s")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["7b", "13b"], nargs="+", default=["7b", "13b"])
    p.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: the projector alone; 2: and the LLM")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=100, help="text tokens per sample (besides 576 image ones)")
    p.add_argument("--load", action="store_true", help="also rank 0's side of build_model's weight broadcast")
    args = p.parse_args(argv)

    from tools.memory import fake_world

    fake_world(args.world_size)
    try:
        results = [dry_run(size, args.stage, args.world_size, args.text_tokens, args.load) for size in args.model]
    finally:
        dist.destroy_process_group()
    for r in results:
        report(r)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0 if all(r["difference"] is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
