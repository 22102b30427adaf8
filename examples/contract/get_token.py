"""GetToken and GetStatus with stubs generated from token_broker.proto alone,
in an environment holding only grpcio and grpcio-tools (no googleapis
protos, no grpcio-status). Usage: get_token.py STUBS_DIR TARGET."""
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import token_broker_pb2 as pb  # noqa: E402
import token_broker_pb2_grpc as rpc  # noqa: E402

with grpc.insecure_channel(sys.argv[2]) as channel:
    stub = rpc.TokenBrokerStub(channel)
    reply = stub.GetToken(pb.GetTokenRequest(environment=pb.ENVIRONMENT_SANDBOX), wait_for_ready=True, timeout=30)
    assert reply.token.access_token and reply.token.token_id, reply
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert len(status.environments) == 2, status
    print(f"python: token_id={reply.token.token_id} serve_for={reply.token.serve_for.seconds}s")
