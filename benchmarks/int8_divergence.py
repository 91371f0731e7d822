"""Where a real int8 network departs from its fake-quantized training model, layer by layer.

Loads a W8A8 ``qat_subnet.pt`` (written by :class:`~lightning_nas.tasks.qat.QATTask`), converts it
with :func:`~lightning_nas.deploy.int8.convert_to_int8` (onednn) and prints:

* top-1 agreement on ``--images`` test images, and the fake-quantized model's top-2 logit margin of
  every image whose prediction flips (against the median margin);
* end to end: for every quantized layer, the share of its input elements that differ between the
  two models (both sit on the layer's learned 8-bit grid, so a difference is a whole number of steps);
* isolated: every int8 conv with a fake-quantized output (conv, BN, output quantizer) fed the same
  int8 input, the share of output elements that differ;
* with ``--runtimes``: the agreement of torch's ``x86`` engine, and of ONNX Runtime unfused
  (``ORT_DISABLE_ALL``) and fused (``ORT_ENABLE_ALL``), each with the exported int32 conv biases
  and with the torch model's float biases put back into the graph.

    python benchmarks/int8_divergence.py --qat-subnet runs/benchmarks/qat_cifar10/middle/w8a8/qat_subnet.pt \\
        --data cifar10 --data-root ../shared/data/cifar10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qat-subnet", type=Path, required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--data-root", default="data/cifar10")
    parser.add_argument("--images", type=int, default=1000, help="test images for the agreement")
    parser.add_argument("--layer-images", type=int, default=200, help="test images for the per-layer figures")
    parser.add_argument("--calibration-images", type=int, default=1000)
    parser.add_argument("--runtimes", action="store_true", help="also the x86 engine and ONNX Runtime")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(1)
    from lightning_nas.deploy.int8 import convert_to_int8, top1_agreement
    from lightning_nas.nn.quantize_model import output_quantizers, quantized_layers
    from lightning_nas.registry import DATA
    from lightning_nas.tasks.qat import load_qat_subnet

    resolution = torch.load(args.qat_subnet, map_location="cpu", weights_only=True)["config"]["r"]
    fake = load_qat_subnet(args.qat_subnet)
    spec = {"name": args.data, "batch_size": 200, "num_workers": 0, "holdout_size": args.calibration_images}
    if args.data == "cifar10":
        spec["root"] = args.data_root
    data = DATA.build(spec)
    data.setup("fit")
    # The test split is kept in stratified order (lightning_nas.data.subsets): its first N images
    # are a seeded sample over every class, not the front of the file.
    images = torch.cat([x for x, _ in data.test_dataloader()])[: args.images]
    x = data.normalize(images, resolution)
    calibration = [data.normalize(b[0], resolution) for b in data.holdout_dataloader(batch_size=100)]
    int8 = convert_to_int8(fake, calibration, backend="onednn")

    with torch.no_grad():
        fake_logits, int8_logits = fake(x), int8(x)
    flipped = fake_logits.argmax(1) != int8_logits.argmax(1)
    top2 = fake_logits.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    report = {"agreement": top1_agreement(int8_logits, fake_logits), "flipped": int(flipped.sum()),
              "median_margin": float(margin.median()), "flipped_margins": sorted(margin[flipped].tolist()),
              "calibrated_tensors": int8.calibrated_tensors}
    print(f"agreement {report['agreement']:.1f} % on {len(x)} images ({report['flipped']} flipped); "
          f"fake-quantized top-2 margin: median {report['median_margin']:.3f}, flipped images "
          f"{[round(m, 3) for m in report['flipped_margins']]}; int8 tensors left to calibration "
          f"{report['calibrated_tensors']}")

    if args.runtimes:
        report["runtimes"] = _runtime_agreement(fake, int8, calibration, x, fake_logits)

    int8_modules = dict(int8.named_modules())
    fake_modules = dict(fake.named_modules())
    sample = x[: args.layer_images]
    fake_inputs: dict[str, torch.Tensor] = {}
    int8_inputs: dict[str, torch.Tensor] = {}
    int8_convs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    layers = {n: q for n, q in quantized_layers(fake).items() if n in int8_modules}
    outputs = output_quantizers(fake)
    for name, (_, activation) in layers.items():
        handles.append(activation.register_forward_hook(lambda m, a, o, n=name: fake_inputs.__setitem__(n, o)))
        handles.append(int8_modules[name].register_forward_pre_hook(
            lambda m, a, n=name: int8_inputs.__setitem__(n, a[0].dequantize() if a[0].is_quantized else a[0])))
        prefix = name.rpartition(".")[0]
        if name.endswith(".conv") and f"{prefix}.bn" in outputs:
            handles.append(int8_modules[name].register_forward_hook(
                lambda m, a, o, n=name: int8_convs.__setitem__(n, (a[0], o))))
    with torch.no_grad():
        fake(sample)
        int8(sample)
        for handle in handles:
            handle.remove()
        print("\nlayer                          end to end: inputs differing   isolated: outputs differing")
        report["layers"] = []
        for name, (_, activation) in layers.items():
            if name not in fake_inputs or name not in int8_inputs:
                continue
            step = float(activation.alpha.detach().abs()) / (127 if activation.signed else 255)
            differing = float(((fake_inputs[name] - int8_inputs[name]).abs() / step > 0.5).float().mean())
            isolated = None
            if name in int8_convs:
                prefix = name.rpartition(".")[0]
                int8_in, int8_out = int8_convs[name]
                reference = fake_modules[f"{prefix}.bn"](fake_modules[name](int8_in.dequantize()))
                out_q = outputs[f"{prefix}.bn"]
                out_step = float(out_q.alpha.detach().abs()) / (127 if out_q.signed else 255)
                isolated = float(((reference - int8_out.dequantize()).abs() / out_step > 0.5).float().mean())
            report["layers"].append({"layer": name, "end_to_end": differing, "isolated": isolated})
            print(f"{name:30s} {differing:12.2e}                 " + ("" if isolated is None else f"{isolated:.2e}"))
    return report


def _runtime_agreement(
    fake: torch.nn.Module, int8: torch.nn.Module, calibration: list, x: torch.Tensor, fake_logits: torch.Tensor
) -> dict[str, float]:
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from lightning_nas.deploy.int8 import convert_to_int8, export_onnx, top1_agreement

    with torch.no_grad():
        agreement = {"torch x86 engine": top1_agreement(convert_to_int8(fake, calibration, backend="x86")(x), fake_logits)}
    with tempfile.TemporaryDirectory() as tmp:
        exported = onnx.load(str(export_onnx(int8, x[:1], Path(tmp) / "model.onnx")))
        float_biases = onnx.ModelProto()
        float_biases.CopyFrom(exported)
        layers = [int8.get_submodule(str(n.target)) for n in int8.graph.nodes
                  if n.op == "call_module" and hasattr(int8.get_submodule(str(n.target)), "set_weight_bias")]
        nodes = [n for n in float_biases.graph.node if n.op_type in ("Conv", "Gemm")]
        if len(layers) != len(nodes):
            raise RuntimeError(f"{len(layers)} int8 conv/linear layers but {len(nodes)} ONNX Conv/Gemm nodes")
        for index, (layer, node) in enumerate(zip(layers, nodes)):
            if layer.bias() is not None and len(node.input) > 2:
                name = f"float_bias_{index}"
                float_biases.graph.initializer.append(numpy_helper.from_array(layer.bias().detach().numpy(), name))
                node.input[2] = name
        for variant, model in (("int32 biases", exported), ("float biases", float_biases)):
            for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
                options = ort.SessionOptions()
                options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
                session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
                logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
                agreement[f"onnxruntime {level}, {variant}"] = top1_agreement(logits, fake_logits)
    for name, value in agreement.items():
        print(f"agreement with the fake-quantized model, {name}: {value:.1f} %")
    return agreement


if __name__ == "__main__":
    main()
