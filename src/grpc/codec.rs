//! The protobuf codec of the TokenBroker service: prost's, except that a
//! request that does not decode (invalid UTF-8 in a string, a truncated or
//! malformed field) is the caller's mistake, INVALID_ARGUMENT, not the
//! INTERNAL that tonic-prost reports for every decode error.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder};

/// prost encoding and decoding with caller-facing decode errors. Named in
/// build.rs as the codec of the generated service and client.
pub struct BrokerCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BrokerCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BrokerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = BrokerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BrokerDecoder(self.0.decoder())
    }
}

/// prost's decoder with decode errors reported as INVALID_ARGUMENT.
pub struct BrokerDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for BrokerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!("malformed request: {}", status.message())),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
