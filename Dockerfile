# syntax=docker/dockerfile:1

# ---- build: a static binary ------------------------------------------------
# The SQLite driver is pure Go, so the binary needs no cgo and no libc, and
# the build stage runs on the build machine's platform and cross-compiles for
# the target one (docker buildx build --platform linux/amd64,linux/arm64 .).
FROM --platform=$BUILDPLATFORM golang:1.26-bookworm AS build
ARG TARGETOS TARGETARCH
WORKDIR /src

# Dependencies first: this layer is reused until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download

# Templates and static files are embedded with go:embed: the binary is the
# whole application.
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags="-s -w" -o /out/proxy .

# The runtime image has no shell to mkdir with, so the data directory of the
# embedded SQLite is made here and copied with its owner. A named volume
# mounted on an empty /data starts with this owner, so nonroot can write it.
RUN mkdir -p /out/data

# ---- runtime: distroless, non-root -------------------------------------------
# static-debian12 carries CA certificates (for the upstream TLS), tzdata and
# /etc/passwd with the nonroot user (uid 65532), and nothing else.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/proxy /proxy
COPY --from=build --chown=65532:65532 /out/data /data

# Without DATABASE_URL the proxy keeps its SQLite database in DATA_DIR; mount
# a volume there (docker run -v proxy-data:/data) to keep it.
ENV DATA_DIR=/data \
    LISTEN_ADDR=:8080
USER nonroot:nonroot
EXPOSE 8080

# No curl or wget in distroless: the binary probes its own /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/proxy", "healthcheck"]
ENTRYPOINT ["/proxy"]
