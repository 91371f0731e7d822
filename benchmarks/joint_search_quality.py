"""Joint search against random search and separate optimisation, at equal evaluation budgets.

For every latency budget (BitFusion accelerator model, batch 1) and every seed, three searches
spend the same number of candidate evaluations (``--evaluations``):

* ``joint``: APQ's evolution over architecture and quantization policy together, scored by the
  quantization-aware predictor;
* ``random``: that many uniformly random (architecture, policy) candidates, the best feasible one;
* ``separate``: half the budget on the architecture at full precision (the evolution scored by the
  fp32 predictor, costs of the W8A8 network so that the budget applies), then half on the policy
  of that architecture (the evolution with the architecture fixed, scored by the quantized
  predictor): APQ's "architecture first, then quantization" baseline.

Each method's best candidate of seed 0 is then really finetuned under its policy from the supernet
weights (:class:`~lightning_nas.tasks.qat.QATTask`, the schedule of ``benchmarks/qat_cifar10.py``)
and its test top-1 measured. Mixed 4/6/8-bit networks do not run on this CPU, so their latency is
the accelerator model's, the quantity the budget constrains. Prints a markdown table and writes
``OUT/results.json`` (updated after every finetuning, so a killed run keeps what it finished)::

    python benchmarks/joint_search_quality.py --quant-predictor RUNS/predictor_quant_cifar10/predictor.pt \\
        --fp32-predictor RUNS/predictor_fp32_cifar10/predictor.pt \\
        --checkpoint RUNS/ofa_supernet_cifar10/checkpoints/last.ckpt --data-root ../shared/data/cifar10 \\
        --epochs 1 --limit-train-batches 0.2 --test-images 2000 --out runs/benchmarks/joint_search_quality
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qat_cifar10 import add_qat_arguments, run_qat  # noqa: E402

METHODS = ("joint", "random", "separate")
#: The CIFAR-10 supernet's space, from the recipe fragment its recipes share.
CIFAR_SPACE = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "fragments" / "cifar10_space.yaml")
                             .read_text(encoding="utf-8"))["space"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant-predictor", type=Path, required=True)
    parser.add_argument("--fp32-predictor", type=Path, required=True)
    parser.add_argument("--space", type=json.loads, default=CIFAR_SPACE, help="the supernet's space spec (JSON)")
    parser.add_argument("--policy-bits", default="4,6,8")
    parser.add_argument("--budgets", default=None,
                        help="latency budgets in ms (comma separated); default: the 10th, 30th and 60th "
                             "percentiles of random candidates' latency")
    parser.add_argument("--evaluations", type=int, default=10_000, help="candidate evaluations per search")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-finetune", action="store_true", help="predicted accuracy only")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/joint_search_quality"))
    add_qat_arguments(parser, checkpoint_required=False)
    args = parser.parse_args(argv)
    if not args.no_finetune and args.checkpoint is None:
        parser.error("--checkpoint (the supernet) is needed to finetune the best candidates; or pass --no-finetune")
    return args


class FixedArchitecture:
    """An architecture space reduced to one architecture: sampling, mutation and crossover all
    return it, so a joint search over it searches the policy only."""

    def __init__(self, space: Any, config: dict) -> None:
        self._space = space
        self._config = space.canonical(config)

    def sample(self, rng: random.Random) -> dict:
        return copy.deepcopy(self._config)

    def mutate(self, config: dict, rng: random.Random, prob: float = 0.1, resolution_prob: float = 0.5) -> dict:
        return copy.deepcopy(self._config)

    def crossover(self, first: dict, second: dict, rng: random.Random) -> dict:
        return copy.deepcopy(self._config)

    def __eq__(self, other: object) -> bool:  # equal to the space it reduces (the scorer checks)
        return self._space == (other._space if isinstance(other, FixedArchitecture) else other)

    __hash__ = object.__hash__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probe dunders before _space exists
            raise AttributeError(name)
        return getattr(self._space, name)


class PolicyBlind(torch.nn.Module):
    """A full-precision predictor behind the quantized scorer's interface (the policy is ignored):
    the separate baseline ranks architectures by fp32 accuracy while paying W8A8 costs."""

    def __init__(self, fp32: torch.nn.Module, policy_features: int) -> None:
        super().__init__()
        self.fp32 = fp32
        self.arch_features = fp32.arch_features
        self.policy_features = policy_features

    def forward(self, arch: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        return self.fp32(arch)


def evolve(joint: Any, scorer: Any, evaluations: int, seed: int) -> tuple[Any, float]:
    """APQ's evolution (population 100, 25 parents, 50 mutants + 50 crossovers per generation):
    the best feasible candidate and its predicted accuracy."""
    from lightning_nas.search.evolution import APQEvolution

    history = APQEvolution(joint, scorer, population_size=100, parents=25, mutations=50, mutation_prob=0.1,
                           resolution_prob=0.5, evaluations=evaluations, seed=seed).run()
    best = history.top_k(1)[0]
    return history.candidate(best), float(history.scores.accuracy[best])


def random_search(joint: Any, scorer: Any, evaluations: int, seed: int) -> tuple[Any, float]:
    rng = random.Random(seed)
    candidates = [joint.sample(rng) for _ in range(evaluations)]
    scores = scorer.score(candidates)
    if not scores.feasible.any():
        raise scorer.infeasible_error(evaluations)
    accuracy = np.where(scores.feasible, scores.accuracy, -np.inf)
    best = int(np.argmax(accuracy))
    return candidates[best], float(scores.accuracy[best])


def cost_models(space_spec: dict, bits: list[int]) -> dict[str, Any]:
    """The accelerator model (latency, energy) and the counts (MACs, BitOps...) for ``bits``."""
    from lightning_nas.hardware.cost_models import BitFusionCostModel, CountsCostModel

    return {"bitfusion": BitFusionCostModel(space_spec, bit_choices=bits, fixed_bits=8),
            "counts": CountsCostModel(space_spec, bit_choices=bits, fixed_bits=8)}


def separate_search(space_spec: dict, space: Any, policy_space: Any, fp32: torch.nn.Module, quant: torch.nn.Module,
                    constraints: dict, evaluations: int, seed: int) -> tuple[Any, float]:
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.search.scoring import Scorer
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    w8 = QuantPolicySpace(bit_choices=[8], fixed_bits=policy_space.fixed_bits)
    joint_w8 = JointSpace(space, w8)
    blind = PolicyBlind(fp32, w8.encoding_size(joint_w8.num_blocks))
    architecture, _ = evolve(joint_w8, Scorer(joint_w8, blind, cost_models(space_spec, [8]), constraints),
                             evaluations // 2, seed)
    joint_policy = JointSpace(FixedArchitecture(space, architecture.config), policy_space)
    models = cost_models(space_spec, list(policy_space.bit_choices))
    return evolve(joint_policy, Scorer(joint_policy, quant, models, constraints),
                  evaluations - evaluations // 2, seed)


def describe(candidate: Any, scorer: Any) -> dict[str, Any]:
    """Costs and mean bits of a candidate, for the table."""
    costs = {k: float(v[0]) for k, v in scorer.costs([candidate]).items()}
    specs = scorer.joint.space.layer_specs(candidate.config)
    weight_bits, activation_bits = scorer.joint.policy_space.average_bits(candidate.policy, specs)
    return {"costs": costs, "mean_weight_bits": weight_bits, "mean_activation_bits": activation_bits}


def finished_qat(run_dir: Path, candidate: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of an earlier finetuning of this very candidate in ``run_dir`` (a rerun after a
    kill finetunes only what is missing), else ``None``."""
    from lightning_nas.tasks.qat import QAT_METRICS_FILE

    path = run_dir / QAT_METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text(encoding="utf-8"))
    same = metrics.get("config") == candidate["config"] and metrics.get("policy") == candidate["policy"]
    return metrics if same else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from lightning_nas.predictors.accuracy import load_predictor
    from lightning_nas.registry import SPACES
    from lightning_nas.search.joint_space import JointSpace
    from lightning_nas.search.scoring import Scorer
    from lightning_nas.spaces.quant_policy import QuantPolicySpace

    space = SPACES.build(args.space)
    bits = [int(b) for b in args.policy_bits.split(",")]
    policy_space = QuantPolicySpace(bit_choices=bits, fixed_bits=8)
    joint = JointSpace(space, policy_space)
    models = cost_models(args.space, bits)
    quant, fp32 = load_predictor(str(args.quant_predictor)), load_predictor(str(args.fp32_predictor))
    if args.budgets:
        budgets = [float(b) for b in args.budgets.split(",")]
    else:
        rng = random.Random(12345)
        latency = Scorer(joint, quant, models).costs([joint.sample(rng) for _ in range(5000)])["latency_ms"]
        budgets = [round(float(np.percentile(latency, q)), 3) for q in (10, 30, 60)]
    print(f"latency budgets (BitFusion, ms): {budgets}; {args.evaluations} evaluations per search", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"budgets": budgets, "evaluations": args.evaluations, "seeds": args.seeds, "rows": []}
    for budget in budgets:
        constraints = {"latency_ms": budget}
        scorer = Scorer(joint, quant, models, constraints)
        for method in METHODS:
            started = time.perf_counter()
            found = []
            for seed in range(args.seeds):
                if method == "joint":
                    found.append(evolve(joint, scorer, args.evaluations, seed))
                elif method == "random":
                    found.append(random_search(joint, scorer, args.evaluations, seed))
                else:
                    found.append(separate_search(args.space, space, policy_space, fp32, quant, constraints,
                                                 args.evaluations, seed))
            predicted = [p for _, p in found]
            best = found[0][0]
            row = {"budget_ms": budget, "method": method, "predicted": predicted,
                   "predicted_mean": statistics.fmean(predicted),
                   "predicted_std": statistics.stdev(predicted) if len(predicted) > 1 else 0.0,
                   "search_seconds": time.perf_counter() - started, "candidate": best.as_dict(),
                   **describe(best, scorer)}
            assert row["costs"]["latency_ms"] <= budget
            results["rows"].append(row)
            print(f"budget {budget} ms, {method}: predicted {row['predicted_mean']:.2f} ± {row['predicted_std']:.2f}",
                  flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")

    if not args.no_finetune:
        for row in results["rows"]:
            run_dir = out / f"{row['budget_ms']}ms" / row["method"]
            started = time.perf_counter()
            qat = finished_qat(run_dir, row["candidate"])
            if qat is None:
                qat = run_qat(args, row["candidate"]["config"], row["candidate"]["policy"], False, run_dir)
            row["finetuned_top1"] = qat["test_top1"]
            row["fp32_top1"] = qat["fp32_top1"]
            row["finetune_seconds"] = time.perf_counter() - started
            print(f"budget {row['budget_ms']} ms, {row['method']}: finetuned top-1 {row['finetuned_top1']:.2f} "
                  f"({row['finetune_seconds']:.0f} s)", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print()
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    lines = ["| latency budget (ms) | method | predicted top-1 (mean ± std) | finetuned test top-1 | latency (ms) "
             "| energy (mJ) | MACs (M) | mean bits w / a |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"]:
        finetuned = f"{row['finetuned_top1']:.2f}" if "finetuned_top1" in row else "-"
        lines.append(
            f"| {row['budget_ms']} | {row['method']} | {row['predicted_mean']:.2f} ± {row['predicted_std']:.2f} "
            f"| {finetuned} | {row['costs']['latency_ms']:.3f} | {row['costs']['energy_mj']:.3f} "
            f"| {row['costs']['macs'] / 1e6:.1f} | {row['mean_weight_bits']:.2f} / {row['mean_activation_bits']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
