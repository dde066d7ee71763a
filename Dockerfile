# ARL: one static binary (`arl`) that is the node daemon, the operator and the in-sandbox agent.
#
#   docker build -t arl .                      # builds from source (needs registry access)
#   docker build --target prebuilt \
#     --build-arg ARL_BINARY=target/x86_64-unknown-linux-gnu/release/arl -t arl .
#                                              # packs an already built static binary; pulls nothing
#
# Both give the same final image: nothing but /arl. It runs as root by default because the node
# daemon needs namespaces and cgroups; the operator's Deployment runs it as a non-root user.

# --- The image from a binary built beforehand (`cargo build --release`; .cargo/config.toml
# makes it static). First in the file: the classic builder builds every stage up to its target.
FROM scratch AS prebuilt
ARG ARL_BINARY=target/x86_64-unknown-linux-gnu/release/arl
COPY ${ARL_BINARY} /arl
ENTRYPOINT ["/arl"]

# --- Builder: a static glibc binary (no musl toolchain needed).
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
    && cp target/x86_64-unknown-linux-gnu/release/arl /arl \
    && /arl --version

# --- The image from source (the default target).
FROM scratch AS image
COPY --from=builder /arl /arl
ENTRYPOINT ["/arl"]
