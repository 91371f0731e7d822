"""The verbs of the command line and the stage module that runs each.

The table lives with the stages, not in the CLI, because the pipeline and sweep stages dispatch
recipes to their stages too; the CLI only turns it into subcommands. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping

#: verb -> (stage module running it, help). The stage module has ``run(recipe) -> Path``.
STAGE_VERBS = {
    "fit": ("lightning_nas.stages.fit", "train the recipe's task (supernet, QAT, predictor, ...)"),
    "search": ("lightning_nas.stages.search", "run the recipe's joint architecture/pruning/quantization search, "
               "or with a `spaceevo:` section SpaceEvo's search over spaces"),
    "export": ("lightning_nas.stages.export", "extract and export a subnet from a trained supernet"),
    "deploy": ("lightning_nas.stages.deploy", "convert a QAT-finetuned subnet (deploy.qat_subnet) to int8, export "
               "it to ONNX, measure its agreement and latency"),
    "profile": ("lightning_nas.stages.profile", "measure a latency table of a space on this machine"),
    "rank": ("lightning_nas.stages.rank", "score NAS-Bench-201 architectures of a CSV with a proxy or ParZC "
             "(`archs=IN.csv out=OUT.csv` set rank.archs / rank.out)"),
    "mqbench": ("lightning_nas.stages.mqbench", "build a mixed-precision quantization benchmark: random per-layer "
                "bits, post-training quantization, top-1 pairs (resumable)"),
    "emq": ("lightning_nas.stages.emq", "evolve a training-free mixed-precision proxy (EMQ) on a benchmark"),
    "allocate": ("lightning_nas.stages.allocate", "allocate bits per layer with an integer program per proxy, "
                 "checked by post-training quantization"),
    "distill": ("lightning_nas.stages.distill", "SpaceEvo block-wise distillation: train every (stage, block type) "
                "cell against a teacher, then a table of the int8 loss of sampled sub-stages (resumable)"),
    "pipeline": ("lightning_nas.stages.pipeline", "run a list of recipes in order, reusing stages already finished"),
}
#: Top-level sections that make a recipe belong to a verb other than ``fit``.
VERB_SECTIONS = ("search", "export", "profile", "rank", "mqbench", "emq", "allocate", "distill", "pipeline")
#: Sections run by a verb of another name: ``spaceevo:`` (SpaceEvo's search over spaces) is a search.
SECTION_VERBS = {"spaceevo": "search"}


def recipe_verb(config: Mapping) -> str:
    """The verb that runs a recipe: the one whose section it has (or that runs it, see
    :data:`SECTION_VERBS`), else ``deploy`` when its
    ``deploy:`` section names a ``qat_subnet`` (every stage recipe may have a ``deploy:`` section:
    its target), else ``fit``."""
    verb = next((verb for verb in VERB_SECTIONS if config.get(verb) is not None), None)
    if verb is None:
        verb = next((verb for section, verb in SECTION_VERBS.items() if config.get(section) is not None), None)
    if verb is not None:
        return verb
    deploy = config.get("deploy")
    return "deploy" if isinstance(deploy, Mapping) and deploy.get("qat_subnet") is not None else "fit"
