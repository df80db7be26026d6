"""The checks every model family must pass, each with its own engine.

1. the engine loads the tiny model and its log-probs equal the learner's (transformers, fp32)
   at the same weights;
2. after a gradient step, the learner's export (`iter_full_weights`: checkpoint names, fused
   experts split back, tied heads left out) pushed through the object-store wire format, the
   engine's log-probs equal the learner's new ones;
3. responses end at any EOS id of generation_config.json (and never run past one), and a chat
   prompt whose template writes the BOS carries exactly one;
4. the saved checkpoint reloads in transformers with the same weights, and in a new engine
   whose log-probs equal the learner's;
5. LoRA with the family's default target modules (`model.lora.target_modules: auto`, through
   the learner's own `load_policy`) takes a step; its merged weights, pushed into that engine,
   give the learner's log-probs (adapter applied);
6. a thinking chat template (Qwen3): `enable_thinking: false` (`data.chat_template_kwargs`)
   adds the empty think block to the rendered prompt, and the engine generates from it.

One process for several families: vLLM's start-up is paid once.

`python -m tests.rollout.family_check FAMILY[:BACKEND] ...` prints one JSON line per family;
tests/rollout/test_families.py runs them all and checks them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOLERANCE = 1e-3  # nats, mean |Δ| per generated token
LR = 3.0  # per-token mean loss, SGD: moves every family by >= 0.05 nats, none stops sampling


class LearnerSide:
    """transformers in fp32 in its own process (started before vLLM is imported), as the learner
    is in a run: vLLM runs some families (OLMo-2) through its Transformers backend, which
    decorates transformers' own classes in the engine's process."""

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_learner_loop, args=(child,), daemon=True)
        self._process.start()

    def __call__(self, op: str, *args):
        self._conn.send((op, args))
        if not self._conn.poll(300):
            raise TimeoutError(f"the learner side did not answer {op!r} within 300 s")
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"learner side, {op}: {value}")
        return value


def _learner_loop(conn) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rlfleet.learner.models import iter_full_weights
    from rlfleet.weight_sync.object_store import iter_chunks

    model = None

    def logprobs(seqs):
        out = []
        for prompt, response in seqs:
            ids = torch.tensor([list(prompt) + list(response)])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            out.append(logp[torch.arange(len(prompt) - 1, len(ids[0]) - 1), torch.tensor(response)])
        return out

    def load(path):
        nonlocal model
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def gap(rollouts):
        with torch.no_grad():
            mine = logprobs([(p, r) for p, r, _ in rollouts])
        return float(torch.cat([(m - torch.tensor(lp)).abs() for m, (_, _, lp) in zip(mine, rollouts, strict=True)]).mean())

    def mean_loss(rollouts):  # raise the sampled responses' log-probs (per token)
        return -torch.cat(logprobs([(p, r) for p, r, _ in rollouts])).mean()

    def step(rollouts):  # a step that moves every weight, the policy still sampling after it
        loss = mean_loss(rollouts)
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=LR).step()
        model.zero_grad()
        return list(iter_chunks(iter_full_weights(model)))

    def save_and_reload(path):
        model.save_pretrained(path)
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return max((a - b).abs().max().item() for a, b in
                   zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True))

    def lora_step(path, rollouts):
        """The saved policy under LoRA (family default targets), one step; its merged export."""
        nonlocal model
        from rlfleet.common.config import LoraConfig
        from rlfleet.learner.models import load_policy, trainable_parameters

        model = load_policy(path, LoraConfig(enabled=True, rank=8, alpha=16), torch.device("cpu"))
        targets = sorted(model.peft_config["default"].target_modules)
        mean_loss(rollouts).backward()
        torch.optim.SGD(trainable_parameters(model), lr=LR).step()
        model.zero_grad()
        return targets, list(iter_chunks(iter_full_weights(model)))

    ops = {"load": load, "gap": gap, "step": step, "save_and_reload": save_and_reload, "lora_step": lora_step}
    while True:
        op, args = conn.recv()
        try:
            conn.send((True, ops[op](*args)))
        except Exception as err:  # noqa: BLE001 - reported to the caller
            conn.send((False, f"{type(err).__name__}: {err}"))


def _mean_logprob(rollouts) -> float:
    """Per generated token: a check on log-probs near 0 (a policy that stopped sampling) proves little."""
    return sum(sum(r.logprobs) for r in rollouts) / max(1, sum(len(r.logprobs) for r in rollouts))


def _plain(rollouts) -> list[tuple[list[int], list[int], list[float]]]:
    return [(list(r.prompt_ids), list(r.response_ids), list(r.logprobs)) for r in rollouts]


def check(family: str, backend: str, root: Path, learner: LearnerSide) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer, GenerationConfig

    from rlfleet.common.config import RolloutConfig
    from rlfleet.common.data import render_prompt
    from rlfleet.common.records import SamplingSpec
    from rlfleet.rollout.backends import backend as backend_class
    from rlfleet.weight_sync.object_store import OBJECT_STORE
    from tests.fixtures.families import build_family_model

    path = build_family_model(family, root / "model")
    tok = AutoTokenizer.from_pretrained(path)
    eos = set(GenerationConfig.from_pretrained(path).eos_token_id)
    learner("load", str(path))
    worker = backend_class(backend)(str(path), RolloutConfig(backend=backend, dtype="float32", max_model_len=256))
    chat = [{"role": "user", "content": "count the a's: banana"}]
    prompts = [chat, "Write a long word: "]
    spec = SamplingSpec(n=16, max_tokens=40, temperature=1.0, seed=1)
    out: dict = {"family": family, "backend": backend,
                 "bos_in_chat_prompt": render_prompt(chat, tok).count(tok.bos_token_id)}

    if "enable_thinking" in (tok.chat_template or ""):
        on, off = (render_prompt(chat, tok, {"enable_thinking": flag}) for flag in (True, False))
        out["thinking_off_adds"] = tok.decode(off[len(on):]) if off[:len(on)] == on else None
        held = worker.generate([off], SamplingSpec(n=2, max_tokens=8, seed=1)).rollouts
        out["thinking_off_prompt_in_engine"] = all(list(r.prompt_ids) == off for r in held)
    first = worker.generate(prompts, spec).rollouts
    out["gap_same_weights"] = learner("gap", _plain(first))
    worker.receive_weights(OBJECT_STORE, 1, 0, *learner("step", _plain(first[:4])))
    out["moved_by_step"] = learner("gap", _plain(first))  # what an engine left with the old weights would show
    second = worker.generate(prompts, spec).rollouts
    out["gap_after_push"] = learner("gap", _plain(second))
    out["push_changed_samples"] = [r.response_ids for r in first] != [r.response_ids for r in second]

    ends = [r.response_ids[-1] for r in first + second if r.finish_reason == "stop"]
    out["eos_ids"] = sorted(eos)
    out["stopped_at"] = sorted({int(t) for t in ends})
    out["ran_past_eos"] = sum(any(t in eos for t in r.response_ids[:-1]) for r in first + second)
    out["stop_not_at_eos"] = sum(t not in eos for t in ends)
    out["reload_max_diff"] = learner("save_and_reload", str(root / "saved"))

    # the checkpoint (weights, configs, tokenizer) in a new engine
    tok.save_pretrained(root / "saved")
    del worker  # one engine at a time in this process
    engine = backend_class(backend)(str(root / "saved"), RolloutConfig(backend=backend, dtype="float32",
                                                                       max_model_len=256))
    spec = SamplingSpec(n=8, max_tokens=40, temperature=1.0, seed=2)  # fewer: the EOS checks are done
    third = engine.generate(prompts, spec).rollouts
    out["reload_engine_gap"] = learner("gap", _plain(third))
    out["mean_logprob"] = [_mean_logprob(rs) for rs in (first, second, third)]

    # LoRA on the family's default targets: one step, the merged weights pushed
    out["lora_targets"], chunks = learner("lora_step", str(root / "saved"), _plain(third[:4]))
    engine.receive_weights(OBJECT_STORE, 2, 0, *chunks)
    out["moved_by_lora"] = learner("gap", _plain(third))
    fourth = engine.generate(prompts, spec).rollouts
    out["lora_gap"] = learner("gap", _plain(fourth))
    out["mean_logprob"].append(_mean_logprob(fourth))
    out["lora_changed_samples"] = [r.response_ids for r in third] != [r.response_ids for r in fourth]
    return out


def run_all(pairs: list[tuple[str, str]], timeout: float = 600) -> list[dict]:
    """`check` for each (family, backend) in one process (the first engine pays vLLM's start-up,
    the next ones ~1 s each); a family that fails reports its error and the others still run."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.rollout.family_check", *(f"{f}:{b}" for f, b in pairs)],
                          cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(root)})
    results = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert len(results) == len(pairs), done.stderr[-3000:]
    return results


def main(args: list[str]) -> None:
    learner = LearnerSide()
    for arg in args:
        family, _, backend = arg.partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result = check(family, backend or "vllm", Path(tmp), learner)
            except Exception as err:  # noqa: BLE001 - reported in the table, with the upstream message
                result = {"family": family, "backend": backend or "vllm", "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(result), flush=True)  # noqa: T201 - the caller reads stdout


if __name__ == "__main__":
    main(sys.argv[1:])
