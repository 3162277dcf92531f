"""Run by torchrun in tests/methods/rfq/test_ddp.py: a few coupled steps on digits with DDP (gloo);
every rank writes its weights and its last sampled configuration for the test to compare."""

import sys

import torch

from rfq.data import load_digits_dataset
from rfq.methods.rfq import CoupledTrainer as Trainer

from method_utils import coupled_config

out = sys.argv[1]
torch.set_num_threads(1)
cfg = coupled_config(epochs=2, steps_per_epoch=3, batch_size=32, freeze_start=0)
trainer = Trainer(cfg, out, dataset=load_digits_dataset(), progress=False)
trainer.run()
rank = trainer.dist.rank
torch.save({"model": trainer.model.state_dict(), "config": trainer.sample_config(),
            "world": trainer.dist.world, "steps": trainer.step},
           f"{out}/rank{rank}.pt")
torch.distributed.destroy_process_group()
