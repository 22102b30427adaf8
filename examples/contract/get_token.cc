// GetToken with C++ stubs generated from token_broker.proto alone (Debian's
// protobuf-compiler-grpc and libgrpc++-dev). Usage: get_token TARGET.
#include <chrono>
#include <iostream>
#include <grpcpp/grpcpp.h>
#include "token_broker.grpc.pb.h"

int main(int argc, char** argv) {
  if (argc != 2) { std::cerr << "usage: get_token TARGET\n"; return 2; }
  auto channel = grpc::CreateChannel(argv[1], grpc::InsecureChannelCredentials());
  auto stub = flute::tokenbroker::v1::TokenBroker::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  context.set_wait_for_ready(true);
  flute::tokenbroker::v1::GetTokenRequest request;
  request.set_environment(flute::tokenbroker::v1::ENVIRONMENT_SANDBOX);
  flute::tokenbroker::v1::GetTokenResponse reply;
  grpc::Status status = stub->GetToken(&context, request, &reply);
  if (!status.ok()) {
    std::cerr << "GetToken: " << status.error_code() << " " << status.error_message() << "\n";
    return 1;
  }
  if (reply.token().access_token().empty() || reply.token().token_id().empty()) {
    std::cerr << "GetToken: an empty token\n";
    return 1;
  }
  std::cout << "c++: token_id=" << reply.token().token_id()
            << " serve_for=" << reply.token().serve_for().seconds() << "s\n";
  return 0;
}
