#!/usr/bin/env python
"""Write the synthetic COCO-format detection dataset (train and val splits).

    python tools/make_synthetic_dataset.py                      # the bundled sizes, into
                                                                # $DETECTRON2_DATASETS/msad_synth
    python tools/make_synthetic_dataset.py --root /data --train-images 5000 --val-images 500
    python tools/make_synthetic_dataset.py --scene msad_detail     # the method benchmark's data

The bundled splits are generated on first use anyway; this tool is for other sizes, seeds or
places.  Same seed, same bytes.
"""
import argparse
import os
import sys
import time

from msad.data.synthetic import SCENES, dataset_root, generate_split, split_paths


def progress_printer(split):
    start = time.time()

    def report(done, total):
        if done == total or done % max(1, total // 20) == 0:
            elapsed = time.time() - start
            eta = elapsed / done * (total - done)
            print(f"\r{split}: {done}/{total} images, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  end="\n" if done == total else "", file=sys.stderr, flush=True)

    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=dataset_root(), help="dataset root (default: %(default)s)")
    scenes = {scene.name: scene for scene in SCENES}
    parser.add_argument("--scene", choices=sorted(scenes), default=SCENES[0].name,
                        help="which synthetic dataset (default: %(default)s)")
    for spec in SCENES[0].splits:  # every scene has a train and a val split
        parser.add_argument(f"--{spec.name}-images", type=int,
                            help=f"default: the scene's own ({spec.num_images} for {SCENES[0].name})")
        parser.add_argument(f"--{spec.name}-seed", type=int)
    args = parser.parse_args(argv)
    scene = scenes[args.scene]
    for spec in scene.splits:
        count, seed = getattr(args, f"{spec.name}_images"), getattr(args, f"{spec.name}_seed")
        count = spec.num_images if count is None else count
        seed = spec.seed if seed is None else seed
        if count < 1:
            parser.error(f"--{spec.name}-images must be at least 1, got {count}")
        json_file, image_dir = split_paths(spec.name, args.root, scene)
        coco = generate_split(json_file, image_dir, count, seed, progress_printer(spec.name),
                              scene)
        print(f"{spec.name}: {len(coco['images'])} images, {len(coco['annotations'])} boxes -> "
              f"{os.path.abspath(json_file)}")


if __name__ == "__main__":
    main()
