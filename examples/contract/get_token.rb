# GetToken with Ruby stubs generated from token_broker.proto alone (Debian's
# ruby-grpc and ruby-grpc-tools). Usage: ruby get_token.rb STUBS_DIR TARGET.
$LOAD_PATH.unshift(ARGV[0])
require 'grpc'
require 'token_broker_services_pb'

stub = Flute::Tokenbroker::V1::TokenBroker::Stub.new(ARGV[1], :this_channel_is_insecure)
request = Flute::Tokenbroker::V1::GetTokenRequest.new(environment: :ENVIRONMENT_SANDBOX)
reply = stub.get_token(request, deadline: Time.now + 30)
raise "an empty token" if reply.token.access_token.empty? || reply.token.token_id.empty?
puts "ruby: token_id=#{reply.token.token_id} serve_for=#{reply.token.serve_for.seconds}s"
