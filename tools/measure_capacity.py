#!/usr/bin/env python
"""Count what each model costs in multiply-accumulates (MACs), with fvcore.

Two tables, printed and written as JSON (--output):

1. MSAD's "capacity": backbone MACs relative to the width-1.0 slimmable ResNet-50 on an
   800x1333 image; the teacher counts its HR and its 0.5x LR pass, the student its LR pass.
   Three columns per number: the paper's value, the value counted on our ResNet at that width,
   and the idealised w^2 x (1 + 1/4) (teacher) or w^2 / 4 (student).  The paper's column is the
   idealised one rounded to two decimals; counted, the 3-channel stem scales with w rather than
   w^2 and the borders of odd-sized maps round up, which is where the two differ.
2. End-to-end inference MACs of every model (backbone, FPN, head, fusion, down-sampler
   separately) at --size, as the model really runs: one inference forward of the model is
   watched, and every call of each of its parts (its child modules: the teacher's backbone runs
   twice) is counted on the very inputs it got, so the count follows the model's own code.
   Images are padded as the model pads them (``branch_input_sizes``).

Counted: convolutions and linear layers (fvcore's handles), not norms, activations, resizing.

    python tools/measure_capacity.py [--size 800 1333] [--output output/capacity.json]
"""
import argparse
import json
import os

from msad.benchmark.cost import CAPACITY_SIZE, capacity_table, end_to_end_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=list(CAPACITY_SIZE),
                        metavar=("H", "W"), help="image size of the end-to-end table")
    parser.add_argument("--output", default="output/capacity.json")
    parser.add_argument("--capacity-only", action="store_true")
    args = parser.parse_args(argv)

    rows, reference = capacity_table()
    print(f"MSAD capacity: backbone MACs / width-1.0 ResNet-50 at 800x1333 "
          f"({reference / 1e9:.2f} GMACs)")
    print(f"{'width':>6} {'role':<8} {'paper':>6} {'counted':>8} {'idealised':>10}")
    for r in rows:
        print(f"{r['width']:6.2f} {r['role']:<8} {r['paper']:6.2f} {r['counted']:8.3f} "
              f"{r['idealised']:10.4f}")
    result = {"capacity": rows, "capacity_reference_gmacs": reference / 1e9}

    if not args.capacity_only:
        size = tuple(args.size)
        print(f"\nEnd-to-end inference GMACs at {size[0]}x{size[1]} (width 1.0, zoo configs):")
        table = end_to_end_table(size)
        keys = ["backbone", "fpn", "head", "fusion", "downsampler", "total"]
        print(f"{'model':<28} {'backbone input':<20}" + "".join(f"{k:>12}" for k in keys)
              + f"{'vs HR':>8}")
        for r in table:
            cells = "".join(f"{r.get(k, 0.0):12.1f}" for k in keys)
            inputs = " + ".join("x".join(map(str, i)) for i in r["backbone_inputs"])
            print(f"{r['model']:<28} {inputs:<20}{cells}"
                  f"{r['total'] / table[0]['total']:8.2f}")
        result.update(end_to_end=table, size=list(size))

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    main()
