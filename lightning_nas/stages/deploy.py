"""``lightning-nas deploy``: int8 deployment of the subnet a QAT run finetuned, read from its run directory.

The recipe's ``deploy.qat_subnet`` names the ``qat_subnet.pt`` that ``lightning-nas fit`` of a QAT
recipe (``task.name: qat``) writes when fit ends. The fake-quantized subnet is rebuilt from it
(:func:`~lightning_nas.tasks.qat.load_qat_subnet`) and deployed
(:func:`~lightning_nas.deploy.subnet.deploy_int8`); this stage's run directory gets:

* ``model_int8.onnx`` (QDQ) and ``model_fp32.onnx``: the int8 network and its float twin;
* ``latency.json``: the top-1 agreement of torch int8 and ONNX Runtime int8 with the
  fake-quantized model on ``deploy.agreement_images`` test images, the three models' top-1 (in
  percent), and fp32 against int8 latency within each runtime;
* ``deploy/agreement_int8``, ``deploy/agreement_onnx`` and the batch-1 speed-ups in the recipe's
  loggers (``metrics.csv``), where a sweep finds them.

Every file is written under a temporary name and renamed, so a killed deployment leaves whole
files or none, and running it again redoes it. The images come from the recipe's ``data:``
section, else from the QAT run's (its ``config.yaml`` beside ``qat_subnet.pt``), so by default the
calibration slice and the test order are the ones the QAT run used. The target is
``deploy.target``; it must be the one the subnet was finetuned for, unless
``deploy.allow_mixed_targets`` is set, and even then its weight grid must be the subnet's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..progress import progress_bar
from ..recipe.loader import LoadedRecipe
from ..recipe.sections import DeploySettings
from ..recipe.validate import require_sections
from ..targets import DeployTarget, check_same_target, resolve_target
from ..tasks.qat import QAT_SUBNET_FILE
from .common import CONFIG_FILE, build_loggers, prepare_run_dir, seed_everything

#: Which stage writes the file this stage reads (for the error when it is missing).
QAT_WRITER = (f"`lightning-nas fit` of a QAT recipe (task.name: qat, e.g. recipes/qat_finetune.yaml) writes "
              f"{QAT_SUBNET_FILE} into its run directory when fit ends")
WHAT = "a qat_subnet.pt of a QAT run"


def find_qat_subnet(given: str | None) -> Path:
    """``deploy.qat_subnet`` as the path of an existing ``qat_subnet.pt`` (a run directory names
    the file in it)."""
    if given is None:
        raise RecipeError("`lightning-nas deploy` needs the finetuned subnet to deploy", key="deploy.qat_subnet",
                          allowed=f"the path of a {QAT_SUBNET_FILE} ({QAT_WRITER})")
    path = Path(given)
    if path.is_dir():
        path = path / QAT_SUBNET_FILE
    if not path.is_file():
        # the path in the message: a long one would be cut short as `given`
        raise RecipeError(f"the QAT artifact is missing: no file {path}", key="deploy.qat_subnet",
                          allowed=f"an existing {QAT_SUBNET_FILE}: {QAT_WRITER}; run that stage first")
    return path


def read_record(path: Path) -> Mapping[str, Any]:
    """The plain data of a ``qat_subnet.pt`` (no pickle), checked to be deployable as int8."""
    from ..nn.safe_load import load_torch_file, require_mapping

    record = require_mapping(load_torch_file(path, key="deploy.qat_subnet", what=WHAT),
                             ("space", "config", "bits", "output_points", "fixed_ranges", "state_dict"),
                             path=path, key="deploy.qat_subnet", what=WHAT)
    other = {name: tuple(bits) for name, bits in record["bits"].items() if tuple(bits) not in ((8, 8), (None, None))}
    if other:
        name, bits = next(iter(other.items()))
        raise RecipeError(f"int8 deployment needs a subnet finetuned under a uniform 8-bit policy; this one gives "
                          f"{len(other)} layer(s) other bits, e.g. '{name}' {bits}", key="deploy.qat_subnet",
                          given=str(path), allowed="the qat_subnet.pt of a QAT run with task.policy: 8 and task.deploy: true")
    return record


def deploy_target(settings: DeploySettings, record: Mapping[str, Any], path: Path) -> DeployTarget:
    """``deploy.target``, which must be the target the subnet was finetuned for (the mixing rule of
    :mod:`lightning_nas.targets`), and in any case share its weight grid."""
    target = resolve_target(settings.target, key="deploy.target")
    trained = record.get("target")  # absent in files older than deployment targets
    check_same_target({f"qat_subnet {path}": trained}, target.name, settings.allow_mixed_targets, key="deploy.target")
    if trained is not None and resolve_target(trained).weight_qmax != target.weight_qmax:
        raise RecipeError(f"the subnet was finetuned for {trained}, whose 8-bit weight grid is not {target.name}'s",
                          key="deploy.target", given=target.name,
                          allowed=f"{trained}, or finetune the subnet for {target.name}")
    return target


def data_section(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The recipe's ``data:`` section, else the QAT run's (its ``config.yaml`` beside the subnet)."""
    if config.get("data") is not None:
        return dict(config["data"])
    import yaml

    qat_config = path.parent / CONFIG_FILE
    allowed = "a data: section in this recipe (the data the subnet was finetuned on)"
    if not qat_config.is_file():
        raise RecipeError(f"no data: section here, and no {CONFIG_FILE} of the QAT run beside the subnet to take "
                          "it from", key="data", given=str(qat_config), allowed=allowed)
    section = (yaml.safe_load(qat_config.read_text(encoding="utf-8")) or {}).get("data")
    if not isinstance(section, Mapping):
        raise RecipeError("no data: section here, and the QAT run's config has none either", key="data",
                          given=str(qat_config), allowed=allowed)
    return dict(section)


def test_split_sample(datamodule: Any, limit: int, resolution: int) -> tuple[Any, Any]:
    """The first ``limit`` images of the test split, normalised at ``resolution``: the split is kept
    in stratified seeded order, so they are a sample over every class (as QAT's ``test_images``)."""
    import torch

    images, labels, seen = [], [], 0
    for x, y in datamodule.test_dataloader():
        x, y = x[: limit - seen], y[: limit - seen]
        images.append(datamodule.normalize(x, resolution))
        labels.append(y)
        seen += len(y)
        if seen >= limit:
            break
    return torch.cat(images), torch.cat(labels)


def deploy_qat_subnet(path: Path, datamodule: Any, out_dir: Path, settings: DeploySettings,
                      target: DeployTarget, record: Mapping[str, Any]) -> dict[str, Any]:
    """Deploy the subnet of ``path`` (its plain data ``record``) on ``datamodule``'s images;
    returns the ``latency.json`` report written to ``out_dir``."""
    from ..deploy.subnet import deploy_int8, latency_steps
    from ..tasks.qat import load_qat_subnet
    from ..tasks.supernet import holdout_batches

    resolution = int(record["config"]["r"])
    datamodule.setup("fit")
    calibration = [datamodule.normalize(b, resolution)
                   for b in holdout_batches(datamodule, settings.calibration_images, settings.calibration_batch)]
    images, labels = test_split_sample(datamodule, settings.agreement_images, resolution)
    fake = load_qat_subnet(path)
    backend = settings.int8_backend or record.get("int8_backend")  # None: the target's engine
    with progress_bar("deploy", settings.progress, fields=["{task.fields[note]}"], remaining=False) as progress:
        bar = progress.add_task("deploy", total=latency_steps(settings.latency_batch_sizes), note="converting")
        return deploy_int8(
            fake, calibration, images, labels, out_dir, target, record["config"], backend=backend,
            batch_sizes=settings.latency_batch_sizes, warmup=settings.latency_warmup,
            repeats=settings.latency_repeats, threads=settings.latency_threads,
            on_step=lambda note: progress.update(bar, advance=1, note=note),
        )


def run(recipe: LoadedRecipe) -> Path:
    config = recipe.config
    require_sections(config, ("deploy",), "deploy")
    settings = DeploySettings(**config["deploy"])
    path = find_qat_subnet(settings.qat_subnet)
    record = read_record(path)
    target = deploy_target(settings, record, path)
    from ..registry import DATA

    datamodule = DATA.build(data_section(config, path))
    run_dir = prepare_run_dir(recipe)
    seed_everything(config["seed"])
    report = deploy_qat_subnet(path, datamodule, run_dir, settings, target, record)
    agreement = report["agreement"]
    logged = {
        "deploy/agreement_int8": agreement["int8_vs_fake_quant"],
        "deploy/agreement_onnx": agreement["onnx_vs_fake_quant"],
        "deploy/speedup_torch_int8_b1": report["speedup_torch_int8"].get("batch_1", float("nan")),
        "deploy/speedup_onnxruntime_int8_b1": report["speedup_onnxruntime_int8"].get("batch_1", float("nan")),
    }
    for logger in build_loggers(config, run_dir):
        logger.log_metrics(logged, step=0)
        logger.finalize("success")
    print(f"deployed {path}: int8 agreement {agreement['int8_vs_fake_quant']:.1f}%, ONNX "
          f"{agreement['onnx_vs_fake_quant']:.1f}% on {agreement['images']} images, target {target.name} "
          f"-> {run_dir / 'latency.json'}")
    return run_dir
