# creditgate sidecar image. Untested by CI (no Docker engine runs there); the
# compose file beside it is checked by tests/deploy_files.rs.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY lua lua
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bin creditgate

FROM debian:bookworm-slim
RUN useradd --system --no-create-home creditgate
COPY --from=build /src/target/release/creditgate /usr/local/bin/creditgate
COPY examples/creditgate.toml /etc/creditgate/creditgate.toml
USER creditgate
EXPOSE 8080
ENTRYPOINT ["creditgate"]
CMD ["serve", "--config", "/etc/creditgate/creditgate.toml"]
