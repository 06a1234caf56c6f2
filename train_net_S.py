#!/usr/bin/env python
"""Train or evaluate the MSAD low-resolution student, distilled from a frozen teacher.

    python train_net_S.py --config-file configs/MSAD/SLR100-50-S.yaml --num-gpus 8
    python train_net_S.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth

The teacher (MODEL.MSAD.TEACHER.CONFIG_FILE / WEIGHTS) is loaded only to train: it is frozen, in
eval mode, outside the student's checkpoint, optimizer and DDP wrapper.  --eval-only runs the
student alone and needs no teacher.
"""
from detectron2.engine import default_argument_parser, launch

import msad  # noqa: F401  (registers the architectures and datasets)
from msad.distill import unwrap
from msad.engine import Trainer, build_frozen_teacher, run


class StudentTrainer(Trainer):
    """Attaches the frozen teacher (MODEL.MSAD.TEACHER) and the student's schedule hooks."""

    trains_students = True

    def __init__(self, cfg):
        super().__init__(cfg)
        student = unwrap(self.model)
        self.teacher = None
        if cfg.MODEL.MSAD.TEACHER.CONFIG_FILE or student.requires_teacher:
            self.teacher = build_frozen_teacher(cfg)
            student.attach_teacher(self.teacher)

    def build_hooks(self):
        return super().build_hooks() + unwrap(self.model).training_hooks()

    def resume_or_load(self, resume=True):
        # Only a fresh run starts from the teacher; --resume continues the student's own weights.
        fresh = not (resume and self.checkpointer.has_checkpoint())
        if fresh and self.teacher is not None and self.cfg.MODEL.MSAD.STUDENT.INIT_FROM_TEACHER:
            unwrap(self.model).init_from_teacher()
        super().resume_or_load(resume)


def main(args):
    return run(args, StudentTrainer)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
