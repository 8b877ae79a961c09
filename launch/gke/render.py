"""Fills launch/gke/jobset.yaml for one training run and prints it (or applies it with kubectl).

  python launch/gke/render.py --name=xl2 --image=IMAGE --tpu=v5p --topology=4x4x4 --hosts=16 \
      -- --config=dit:variant=XL/2,data=/mnt/shared/in256 --workdir=/mnt/shared/runs/xl2 --dry_run
  python launch/gke/render.py --name=xl2 --image=IMAGE --gpu=nvidia-h100-80gb --hosts=4 \
      --chips_per_host=8 -- --config=... --workdir=/mnt/shared/runs/xl2

One pod per host runs `dit-jax train ARGS --coordinator=auto`. On TPU node pools JAX finds the
slice's workers itself; on GPU node pools the pods get JAX_COORDINATOR_ADDRESS (pod 0 of the
JobSet), JAX_NUM_PROCESSES and JAX_PROCESS_ID (the pod's completion index), which
dit_jax/parallel/distributed.py reads. Without --dry_run the manifest goes to `kubectl apply -f -`.
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
from pathlib import Path

import yaml

TEMPLATE = Path(__file__).with_name("jobset.yaml")
TPU_ACCELERATORS = {  # --tpu -> GKE's cloud.google.com/gke-tpu-accelerator
    "v4": "tpu-v4-podslice",
    "v5e": "tpu-v5-lite-podslice",
    "v5p": "tpu-v5p-slice",
    "v6e": "tpu-v6e-slice",
}
COORDINATOR_PORT = 8476


def render(args: argparse.Namespace, dit_jax_args: list[str]) -> dict:
    """The JobSet manifest (a dict) for the parsed flags; raises ValueError on inconsistent flags."""
    manifest = copy.deepcopy(yaml.safe_load(TEMPLATE.read_text()))
    manifest["metadata"]["name"] = args.name
    job = manifest["spec"]["replicatedJobs"][0]
    job["template"]["spec"]["parallelism"] = args.hosts
    job["template"]["spec"]["completions"] = args.hosts
    pod = job["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["image"] = args.image
    container["command"] = ["dit-jax", "train", *dit_jax_args, "--coordinator=auto"]
    if args.tpu:
        chips = math.prod(int(n) for n in args.topology.split("x"))
        if chips != args.hosts * args.chips_per_host:
            raise ValueError(
                f"topology {args.topology} has {chips} chips, but --hosts={args.hosts} × "
                f"--chips_per_host={args.chips_per_host} = {args.hosts * args.chips_per_host}"
            )
        pod["nodeSelector"] = {
            "cloud.google.com/gke-tpu-accelerator": TPU_ACCELERATORS[args.tpu],
            "cloud.google.com/gke-tpu-topology": args.topology,
        }
        container["resources"]["limits"] = {"google.com/tpu": args.chips_per_host}
        container.pop("env")
    else:
        pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": args.gpu}
        container["resources"]["limits"] = {"nvidia.com/gpu": args.chips_per_host}
        index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        container["env"] = [
            {
                "name": "JAX_COORDINATOR_ADDRESS",
                "value": f"{args.name}-{job['name']}-0-0.{args.name}:{COORDINATOR_PORT}",
            },
            {"name": "JAX_NUM_PROCESSES", "value": str(args.hosts)},
            {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {"fieldPath": index}}},
        ]
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="JobSet name (also the pods' DNS subdomain)")
    parser.add_argument("--image", required=True, help="container image with dit-jax on PATH")
    accelerator = parser.add_mutually_exclusive_group(required=True)
    accelerator.add_argument("--tpu", choices=sorted(TPU_ACCELERATORS), help="TPU node pool generation")
    accelerator.add_argument("--gpu", help="GPU node pool type, e.g. nvidia-h100-80gb")
    parser.add_argument("--topology", help="TPU slice topology, e.g. 4x4x4 (with --tpu)")
    parser.add_argument("--hosts", type=int, required=True, help="pods = JAX processes")
    parser.add_argument("--chips_per_host", type=int, default=None, help="default: 4 TPU chips, 8 GPUs")
    parser.add_argument("--dry_run", action="store_true", help="print the manifest, apply nothing")
    parser.add_argument("dit_jax_args", nargs=argparse.REMAINDER, help="-- then the dit-jax train arguments")
    args = parser.parse_args()
    dit_jax_args = args.dit_jax_args[1:] if args.dit_jax_args[:1] == ["--"] else args.dit_jax_args
    if args.tpu and not args.topology:
        parser.error("--tpu needs --topology")
    if args.chips_per_host is None:
        args.chips_per_host = 4 if args.tpu else 8
    try:
        manifest = yaml.safe_dump(render(args, dit_jax_args), sort_keys=False)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(manifest, end="")
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
