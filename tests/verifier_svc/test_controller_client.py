"""The verifier's controller client over real gRPC: endpoints and policy pushed by the controller are
applied, and steps flow back to the controller."""

from __future__ import annotations

import pytest
from service_threads import LoopThread, ProposerThread, VerifierThread, wait_for

from controller_svc.server import Controller, ControllerConfig
from protocol.serving import from_options
from protocol.v1 import generation_pb2 as pb
from runtime.models import load_model


@pytest.mark.slow
def test_pushed_endpoints_and_policy_are_applied_and_steps_reported(small_vocab_dir, smollm2_tokenizer):
    old, new = ProposerThread(), ProposerThread()
    loop = LoopThread()
    controller = Controller(
        from_options(
            ControllerConfig, port=0, metrics_port=0, policy="fixed:2", proposers=new.address, push_interval_s=0.1
        )
    )
    loop.run(controller.start())
    verifier = VerifierThread(
        load_model(small_vocab_dir),
        smollm2_tokenizer,
        [old.address],
        controller=f"127.0.0.1:{controller.port}",
        verifier_id="v-test",
        cost_profile="none",
    )
    client = verifier.verifier.engine.proposer
    try:
        wait_for(lambda: set(client.replicas) == {new.address})
        assert str(verifier.verifier.engine.planner.policy) == "fixed:2"
        chunks = list(
            verifier.stub.Generate(
                pb.GenerateRequest(
                    prompt_token_ids=pb.TokenIds(ids=[3, 4, 5, 3, 4, 5, 3, 4]), max_new_tokens=16, ignore_eos=True
                ),
                timeout=60,
            )
        )
        assert chunks[-1].speculation.proposed_tokens > 0
        assert new.server.servicer.num_items > 0 and old.server.servicer.num_items == 0
        wait_for(lambda: controller.state.fitter.num_seen >= 4)  # the steps reached the controller
        assert controller.state.goodput("v-test") > 0
    finally:
        verifier.close()
        loop.run(controller.stop())
        loop.stop()
        old.kill()
        new.kill()
