"""The export of a meta-trained causal LM against its checkpoint's learner: the same logits?

python benchmarks/bigbench/check_export.py CKPT EXPORT_FOLDER
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_meta import MetaLearningModule

torch.set_num_threads(1)
ckpt, folder = sys.argv[1], sys.argv[2]
start = time.perf_counter()
module = MetaLearningModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer(
    ["Q: Which is heavier, a feather or a brick?\nA:", "Translate to French: good morning\n"],
    return_tensors="pt",
    padding=True,
)
with torch.no_grad():
    mine = module.learner(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits.float()
    theirs = model(**ids).logits.float()
mask = ids["attention_mask"].bool()
diff = (mine - theirs).abs()[mask].max().item()
print(
    json.dumps(
        {
            "max_abs_logit_difference": diff,
            "logit_scale": mine[mask].abs().max().item(),
            "same_argmax": bool((mine.argmax(-1) == theirs.argmax(-1))[mask].all()),
            "provenance": json.load(open(f"{folder}/meta_learning.json")),
            "seconds": time.perf_counter() - start,
        },
        indent=1,
        default=str,
    )
)
