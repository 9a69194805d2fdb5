"""Writes the small PyTorch files used by tests/test_torch_pickle.py (run once, by hand).

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python tests/data/make_torch_files.py

Needs torch; the project itself never imports it.
"""

import collections
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def state_dict():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7.0
    shared = torch.arange(10, dtype=torch.float32) * 0.5
    sd = collections.OrderedDict()
    sd["f32"] = base
    sd["f16"] = (base / 3).half()
    sd["bf16"] = (base - 1.5).bfloat16()
    sd["i64"] = torch.arange(-3, 5, dtype=torch.int64)
    sd["i32"] = torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)
    sd["u8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    sd["flag"] = torch.tensor([True, False, True])
    sd["transposed"] = base.t()  # non-contiguous view (strides (1, 6))
    sd["shared_full"] = shared
    sd["shared_slice"] = shared[3:8]  # view with a storage offset into the same storage
    sd["strided"] = shared[::3]  # stride 3
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.full((2, 2), -0.25))
    return sd


def expected(sd):
    out = {}
    for k, v in sd.items():
        v = v.detach()
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def main():
    sd = state_dict()
    torch.save(sd, os.path.join(HERE, "torch_state_dict.bin"))
    torch.save(sd, os.path.join(HERE, "torch_state_dict_legacy.pt"), _use_new_zipfile_serialization=False)
    lightning = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": collections.OrderedDict(
            [("model.weight", torch.ones(3, 2)), ("model.bias", torch.tensor([0.5, -1.0, 2.0])),
             ("loss.disc.weight", torch.zeros(2))]
        ),
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.ones(3, 2) * 0.1}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]}
        ],
        "lr_schedulers": [],
        "hyper_parameters": {"embed_dim": 256, "name": "vqgan", "ratios": [1.0, 2.0], "flags": {1, 2}},
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
    }
    torch.save(lightning, os.path.join(HERE, "lightning_style.ckpt"))
    # A whole pickled module: a real file the restricted unpickler must refuse.
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(2, 2), os.path.join(HERE, "torch_module_pickle.pt"))
    np.savez(os.path.join(HERE, "torch_state_dict_expected.npz"), **expected(sd))




def maskbit_bin():
    """tests/data/maskbit_bert_prenorm_s1.npz's weights as a real torch .bin: float16
    tensors, the int32 buffer, and the legacy `token_emb` name for `input_proj`."""
    z = np.load(os.path.join(HERE, "maskbit_bert_prenorm_s1.npz"))
    sd = collections.OrderedDict()
    for k in z.files:
        if k.startswith("sd/"):
            name = k[3:].replace("input_proj.", "token_emb.")
            sd[name] = torch.from_numpy(np.array(z[k]))
    torch.save(sd, os.path.join(HERE, "maskbit_bert_prenorm_s1.bin"))


if __name__ == "__main__":
    # MASKBIT_BIN=1 writes only maskbit_bert_prenorm_s1.bin (added later; the other files
    # are kept byte-identical by not rewriting them).
    maskbit_bin() if os.environ.get("MASKBIT_BIN") else main()
