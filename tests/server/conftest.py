"""Real servers on 127.0.0.1 (ephemeral ports) over one tiny random-weight pipeline."""
from __future__ import annotations

import pytest

from memguard.engine import PipelineEngine
from memguard.server.app import BackgroundServer
from server_testlib import make_config


@pytest.fixture(scope="session")
def tiny_pipe():
    import torch

    from memguard.models import build_tiny_pipeline

    torch.set_num_threads(1)   # a background job owns the cores; stay small
    torch.manual_seed(0)
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def engine(tiny_pipe) -> PipelineEngine:
    return PipelineEngine(tiny_pipe)


@pytest.fixture
def serve():
    """serve(engine, **config overrides) → a started BackgroundServer, stopped at teardown."""
    servers: list[BackgroundServer] = []

    def start(engine, **overrides) -> BackgroundServer:
        server = BackgroundServer(make_config(**overrides), engine)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(engine):
    """One default server per test module."""
    srv = BackgroundServer(make_config(), engine)
    srv.start()
    yield srv
    srv.stop()


