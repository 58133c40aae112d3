"""``python -m dali_pipelines.fbank IN.wav OUT.npy``: the Kaldi log-mel filterbank of a whole file.

Writes float32 (frames, 128), before padding and normalisation, computed by the code training
uses: resampling to 16 kHz when needed (``kernels.resample``), the DALI audio stage (decode,
downmix, mean removal) and the filterbank kernel, on the GPU when one is present, else the CPU.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np
import soundfile
import torch
from nvidia.dali import fn, pipeline_def

from dali_pipelines import audio
from dali_pipelines.sources import read_wav
from kernels.fbank import fbank


@pipeline_def(batch_size=1, num_threads=1)
def _one_file_pipeline(data: np.ndarray, target_frames: int):
    wav = fn.external_source(source=lambda: [data], batch=True)
    return audio.waveform(wav, target_frames)


def file_fbank(path: str, device: torch.device | None = None) -> np.ndarray:
    """Kaldi filterbank (frames, 128) of the whole wav at ``path`` through the pipeline's stages."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = read_wav(path, audio.SAMPLE_RATE)
    # Enough frames for the whole file; the kernel reports the real count.
    info = soundfile.info(io.BytesIO(data.tobytes()))
    target = max(1, 2 + info.frames // 160)
    device_id = (device.index or 0) if device.type == "cuda" else None
    pipe = _one_file_pipeline(data, target, device_id=device_id)
    pipe.build()
    wave, length = (np.array(t.as_tensor()) for t in pipe.run())
    out = fbank(torch.from_numpy(wave).to(device), torch.from_numpy(length).reshape(-1).to(device))
    return out.feats[0, : int(out.num_frames[0])].cpu().numpy().astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wav", help="input wav file")
    parser.add_argument("out", help="output .npy file")
    args = parser.parse_args(argv)
    try:
        feats = file_fbank(args.wav)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    np.save(args.out, feats)
    print(f"{args.wav}: {feats.shape[0]} frames x {feats.shape[1]} mel bins -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
