//! The protobuf codec of Quiver's services: prost's, except that a request that
//! does not decode is the client's fault (`INVALID_ARGUMENT`), not the server's
//! (`INTERNAL`, which is what tonic-prost reports).

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Codec used by every generated Quiver client and server.
#[derive(Debug, Clone, Copy)]
pub struct QuiverCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for QuiverCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for QuiverCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = QuiverDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        QuiverDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// Decoder that reports undecodable bytes as `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct QuiverDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for QuiverDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!(
                    "malformed protobuf message: {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
