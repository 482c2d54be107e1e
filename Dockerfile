# hvd-pcdarts for GPU hosts: CUDA 13 + cuDNN, torch 2.14.1, Open MPI, Horovod 0.28.1 with NCCL, sshd for
# multi-node runs. Build from the repository root:
#
#   docker build -t hvd-pcdarts .
#
# Not built on the project's CI machines (no Docker engine, no GPU there): only scripts/install_horovod.sh,
# which this file runs, is exercised by CI. See docs/launch.md ("Docker") for single- and multi-node use.
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

# Fail a RUN whose pipeline fails anywhere (the check-build line below relies on it).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none

# Python 3 + venv, compilers for Horovod, Ubuntu's Open MPI, ssh server and client, graphviz for the pictures.
# (Ubuntu's versions are not pinned: the base image tag already fixes the release.)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv \
        build-essential cmake git ca-certificates \
        openmpi-bin libopenmpi-dev \
        openssh-server openssh-client \
        graphviz \
 && rm -rf /var/lib/apt/lists/*

# SSH for multi-node launches: sshd listens on 12345 (the host's own sshd keeps 22 under --network host), root
# logs in with keys only, and the client skips host-key prompts - acceptable inside a private cluster network
# only. Mount or bake the cluster's shared key pair into /root/.ssh (id_rsa + authorized_keys).
RUN mkdir -p /run/sshd /root/.ssh \
 && chmod 700 /root/.ssh \
 && printf 'Port 12345\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n' \
        > /etc/ssh/sshd_config.d/hvd-pcdarts.conf \
 && printf 'Host *\n    Port 12345\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
        > /etc/ssh/ssh_config.d/hvd-pcdarts.conf
EXPOSE 12345

# The project's Python environment: torch 2.14.1 (a CUDA 13 build on PyPI) and torchvision 0.29.1; the
# packaging tools themselves are left unpinned.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel \
 && pip install torch==2.14.1 torchvision==0.29.1

# Horovod 0.28.1 with NCCL GPU operations, built by the same script as on every other machine (it patches the
# sources for torch 2.14 and adds the CXXFLAGS gcc 13 needs); the build cache is dropped afterwards.
COPY scripts/install_horovod.sh /tmp/install_horovod.sh
RUN HVD_PCDARTS_GPU=1 PYTHON=/opt/venv/bin/python HVD_PCDARTS_WHEEL_CACHE=/tmp/hvd-wheels \
        bash /tmp/install_horovod.sh \
 && rm -rf /tmp/hvd-wheels /tmp/install_horovod.sh

# The project itself, editable, with the picture extras (graphviz, matplotlib).
WORKDIR /workspace/hvd-pcdarts
COPY . .
RUN pip install -e ".[viz,export]"

# The build must end with a Horovod that has PyTorch, MPI, Gloo and NCCL.
RUN horovodrun --check-build | tee /tmp/check-build.txt \
 && grep -q '\[X\] PyTorch' /tmp/check-build.txt \
 && grep -q '\[X\] NCCL' /tmp/check-build.txt \
 && grep -q '\[X\] MPI' /tmp/check-build.txt \
 && grep -q '\[X\] Gloo' /tmp/check-build.txt \
 && rm /tmp/check-build.txt

CMD ["bash"]
