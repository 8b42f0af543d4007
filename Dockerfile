# CPU image: the demo and the server with the lite renderer (or real weights mounted at /app/models).
# GPU: build FROM a CUDA PyTorch image and install with `pip install -e .` after installing a CUDA torch.
FROM python:3.11-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      espeak-ng ffmpeg libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY musetalk_warm ./musetalk_warm
COPY configs ./configs
COPY scripts ./scripts
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -e .

ENV MUSETALK_WARM_SERVER__HOST=0.0.0.0
EXPOSE 8000
VOLUME ["/app/models", "/app/results"]
CMD ["musetalk-warm", "serve"]
