# The Sallyport image: Node.js 24 and one bundled file on a Debian bookworm root with the kernel
# tools the agent spawns. The same image runs the controller (`sallyport controller`) and the agent
# (`sallyport agent`). `make image` (scripts/image.ts) prepares the build context and builds it
# with buildah, from Debian's and npm's packages only (no base image from a registry):
#   rootfs.tar  Debian bookworm made by mmdebstrap: iptables, ipset, nftables, iproute2, procps,
#               conntrack, kmod, ca-certificates, libstdc++6
#   node        the Node.js binary of the pinned npm package `node` (package-lock.json)
#   dist/       the esbuild bundle (scripts/build.ts)
# Any engine builds the same context: `docker build -f Dockerfile <context>`.
FROM scratch
ADD rootfs.tar /
COPY node /usr/local/bin/node
COPY dist/ /opt/sallyport/
ENV NODE_ENV=production
ENTRYPOINT ["node", "/opt/sallyport/sallyport.mjs"]
