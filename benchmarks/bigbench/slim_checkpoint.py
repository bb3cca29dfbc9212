"""Re-save a full ``fit`` checkpoint as lightning-meta now saves one (the frozen pretrained base left out)
and compare the two: file sizes, and the learner's logits after loading each.

python benchmarks/bigbench/slim_checkpoint.py FULL_CKPT SLIM_CKPT
"""

import json
import os
import sys

import torch

from lightning_meta import MetaLearningModule

torch.set_num_threads(1)
full_path, slim_path = sys.argv[1], sys.argv[2]
full = torch.load(full_path, map_location="cpu", weights_only=True)
module = MetaLearningModule.load_from_checkpoint(full_path, map_location="cpu").eval()
checkpoint = dict(full, state_dict=dict(module.state_dict()))
module.on_save_checkpoint(checkpoint)  # what the trainer calls when it saves
torch.save(checkpoint, slim_path)
slim = MetaLearningModule.load_from_checkpoint(slim_path, map_location="cpu").eval()
ids = torch.randint(0, 40_000, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    same = torch.equal(module.learner(input_ids=ids).logits, slim.learner(input_ids=ids).logits)
print(
    json.dumps(
        {"full_MB": os.path.getsize(full_path) / 1e6, "slim_MB": os.path.getsize(slim_path) / 1e6, "same_logits": same},
        indent=1,
    )
)
