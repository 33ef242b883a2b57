# A test with two machines: `server` serves a file with busybox httpd, `client` fetches it by
# the server's name over the test network. Both are the standin image, revived.
#
#   cargo build --release && scripts/register
#   nix-build --plugin-files "$PWD/target/release/libnix_winvm.so" examples/two-machines.nix
#   ls result/                       # log.txt junit.xml screenshots/ nodes/ test-network.pcap
#
#   nix-build --plugin-files ... examples/two-machines.nix -A driverInteractive
#   result/bin/nix-winvm-test-driver # a Python prompt with the nodes; Ctrl-D stops every VM
#
# With Windows, the nodes are windowsImage calls (or layers) and the commands run in Cygwin's
# bash (README, "Tests with several machines").
{ accel ? "tcg" }:
let
  winvm = import ../nix { };
  image = builtins.windowsImage { guest = "standin"; inherit accel; };
in
winvm.windowsTest {
  name = "two-machines";
  nodes = { server = image; client = image; };
  testScript = ''
    start_all()
    with subtest("the server serves a page"):
        server.succeed("mkdir -p /tmp/www && echo 'hello from the server' > /tmp/www/index.html")
        server.succeed("httpd -p 80 -h /tmp/www")
    with subtest("the client fetches it by name"):
        client.wait_for_open_port(80, "server")
        page = client.succeed("wget -q -O - http://server/")
        assert page == "hello from the server\n", page
    client.screenshot("client")
  '';
}
