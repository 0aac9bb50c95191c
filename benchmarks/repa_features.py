"""Per-emoji effnet-lite0 feature maps (last block, 320-d), pooled to 4x4: REPA targets (probe)."""
import sys
import torch, torch.nn.functional as F
from matryoshka.config.presets import load_run_config
from matryoshka.data import build_dataset
from matryoshka.evaluation.efficientnet import load_efficientnet_lite0, preprocess

out, layer = sys.argv[1], sys.argv[2]  # layer: "block" (320-d) or "head" (1280-d)
config = load_run_config("emoji64")
data = build_dataset(config.data)
net = load_efficientnet_lite0()
feats = []
with torch.no_grad():
    for start in range(0, len(data), 64):
        x = torch.stack([data[i]["image"] for i in range(start, min(start + 64, len(data)))])
        x = preprocess(x)
        x = F.relu6(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x)
        if layer == "head":
            x = F.relu6(net._bn1(net._conv_head(x)))
        feats.append(F.adaptive_avg_pool2d(x, 4).half())
        print(start, flush=True)
feats = torch.cat(feats)
torch.save(feats, out)
print(feats.shape)
