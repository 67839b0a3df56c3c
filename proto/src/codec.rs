//! The gRPC codec of every generated service and client: prost, with small initial buffers.
//!
//! Why not tonic's default: `ProstCodec` starts every stream with an 8 KiB encode buffer and
//! an 8 KiB decode buffer. A leader holding 10,000 agent sessions (messages of a few hundred
//! bytes) kept 160 MB in them alone, a third of the issue 2 fan-in budget (heaptrack of the
//! fan-in benchmark). The buffers still grow to fit any message (Raft AppendEntries and
//! snapshot chunks): tonic reserves a message's whole length before decoding it, and the
//! encoder grows its buffer as prost writes.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::prost::Message;
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First allocation of a stream's encode and decode buffers.
pub const BUFFER_SIZE: usize = 512;
/// How much encoded data a response stream buffers before it yields (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_SIZE`] buffers (`codec_path` in build.rs).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec { _pd: PhantomData }
    }
}

/// The buffer settings of [`LeanCodec`].
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message far larger than the initial buffers round-trips, several in a row, through
    /// tonic's real stream encode and decode path.
    #[tokio::test]
    async fn large_message_round_trips_through_small_buffers() {
        use futures::StreamExt;
        let mut codec = LeanCodec::<crate::pb::AgentMessage, crate::pb::AgentMessage>::default();
        let big = crate::pb::AgentMessage {
            msg: Some(crate::pb::agent_message::Msg::Hello(crate::pb::Hello {
                host_id: "h".repeat(200_000),
                ..Default::default()
            })),
        };
        let source = futures::stream::iter(vec![Ok::<_, tonic::Status>(big.clone()); 3]);
        let body = tonic::codec::EncodeBody::new_client(codec.encoder(), source, None, None);
        let mut decoded = tonic::codec::Streaming::new_request(codec.decoder(), body, None, None);
        let mut n = 0;
        while let Some(m) = decoded.next().await {
            assert_eq!(m.expect("decodes"), big);
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
