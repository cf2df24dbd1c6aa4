# Dashboard image: pinned CPU-only requirements, the sample run built at image build time,
# Streamlit on port 8501 as a non-root user.
#   docker build -t multistage-influence .
#   docker run -p 127.0.0.1:8501:8501 multistage-influence
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_INPUT=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

WORKDIR /app

# Dependencies first so this layer is cached while only the code changes.  The extra index
# serves torch's CPU-only wheel (torch==2.13.0 matches 2.13.0+cpu, which pip prefers), so the
# image never pulls the CUDA build.
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements.txt \
    && python -c "import torch; assert torch.version.cuda is None, torch.__version__"

RUN groupadd --gid 10001 app \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin app \
    && chown 10001:10001 /app

COPY --chown=10001:10001 . .

USER 10001:10001

# The sample run the dashboard opens by default.
RUN python -m engine run sample_data/digits/config.toml --out runs/digits

EXPOSE 8501

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]

# .streamlit/config.toml (copied with the code) binds 127.0.0.1; inside the container the
# server must listen on the container's own interface, so this flag overrides it explicitly.
# Publish it on the host's loopback only (docker run -p 127.0.0.1:8501:8501 ...).
CMD ["python", "-m", "streamlit", "run", "dashboard/app.py", \
     "--server.headless", "true", \
     "--server.address", "0.0.0.0", \
     "--server.port", "8501", \
     "--browser.gatherUsageStats", "false"]
