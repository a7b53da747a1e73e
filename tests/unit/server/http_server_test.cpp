// HttpServer (server/http_server.h) on a real socket: what it answers, and that a process out of
// file descriptors neither spins a core nor stops serving once descriptors are free again.
#include "server/http_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace lorad::server {
namespace {

// Connects `fd` (a TCP socket) to 127.0.0.1:port; false when it cannot.
bool ConnectSocket(int fd, int port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) return false;
  timeval timeout{5, 0};  // a server that never answers fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  return true;
}

// A connected, blocking client socket to 127.0.0.1:port; -1 when it cannot connect.
int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && !ConnectSocket(fd, port)) {
    close(fd);
    return -1;
  }
  return fd;
}

// Sends `request` on `fd` and reads until the server closes the connection.
std::string Exchange(int fd, const std::string& request) {
  if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size()))
    return "";
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
  return response;
}

std::string Get(int port, const std::string& path) {
  const int fd = Connect(port);
  if (fd < 0) return "";
  std::string response = Exchange(fd, "GET " + path + " HTTP/1.1\r\nHost: test\r\n\r\n");
  close(fd);
  return response;
}

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

int OpenFileDescriptors() {
  int n = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd"))
    ++n;
  return n;
}

// A port free now (the kernel's choice for port 0; server addresses must name their port).
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t size = sizeof(address);
  const bool bound = bind(fd, reinterpret_cast<sockaddr*>(&address), size) == 0 &&
                     getsockname(fd, reinterpret_cast<sockaddr*>(&address), &size) == 0;
  close(fd);
  return bound ? ntohs(address.sin_port) : 0;
}

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status started = server_.Start("127.0.0.1:" + std::to_string(FreePort()));
    ASSERT_TRUE(started.ok()) << started;
  }

  MetricsRegistry metrics_;
  ServingState state_;
  HttpServer server_{metrics_, state_};
};

TEST_F(HttpServerTest, HealthFollowsTheLifecycleAndMetricsRender) {
  EXPECT_EQ(Get(server_.port(), "/healthz").rfind("HTTP/1.1 503", 0), 0u);
  state_.Set(Lifecycle::kServing);
  const std::string health = Get(server_.port(), "/healthz");
  EXPECT_EQ(health.rfind("HTTP/1.1 200", 0), 0u) << health;
  EXPECT_NE(health.find("\r\n\r\nserving\n"), std::string::npos) << health;
  metrics_.AddCounter("lorad_test_total", "A counter of this test.", {}).Inc({}, 3);
  const std::string scrape = Get(server_.port(), "/metrics");
  EXPECT_EQ(scrape.rfind("HTTP/1.1 200", 0), 0u) << scrape;
  EXPECT_NE(scrape.find("lorad_test_total 3"), std::string::npos) << scrape;
  EXPECT_EQ(Get(server_.port(), "/other").rfind("HTTP/1.1 404", 0), 0u);
}

// With every descriptor the process may open in use, a new connection cannot be accepted: it
// waits in the listen queue, which keeps the listening socket readable. The server must wait for
// descriptors rather than poll and fail in a loop, and answer once there are some again.
TEST_F(HttpServerTest, OutOfDescriptorsItWaitsWithoutSpinningThenServes) {
  state_.Set(Lifecycle::kServing);
  rlimit original{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &original), 0);
  // The client's socket is made first: connecting it needs no further descriptor.
  const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(client, 0);
  rlimit low = original;
  low.rlim_cur = static_cast<rlim_t>(OpenFileDescriptors() + 8);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> fillers;
  for (int fd; (fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) fillers.push_back(fd);
  const int open_errno = errno;
  const bool connected = ConnectSocket(client, server_.port());

  const double cpu_before = ProcessCpuSeconds();
  const auto wall_before = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  const double cpu = ProcessCpuSeconds() - cpu_before;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_before).count();

  for (int fd : fillers) close(fd);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &original), 0);
  ASSERT_EQ(open_errno, EMFILE);
  ASSERT_TRUE(connected);
  // A server polling the listening socket and failing to accept keeps a core busy: CPU time
  // close to the wall time.
  EXPECT_LT(cpu, 0.3 * wall) << "the process used " << cpu << " s of CPU in " << wall
                             << " s while the server could not accept";
  const std::string answer = Exchange(client, "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
  EXPECT_EQ(answer.rfind("HTTP/1.1 200", 0), 0u) << "the waiting connection got: " << answer;
  close(client);
}

// A getaddrinfo list of numeric hosts on one port, as a host name resolving to several addresses
// gives (localhost: ::1 and 127.0.0.1 on most hosts; an address can be listed twice).
class AddressList {
 public:
  AddressList(const std::vector<std::string>& hosts, int port) {
    addrinfo hints{};
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_PASSIVE;
    for (const std::string& host : hosts) {
      addrinfo* one = nullptr;
      EXPECT_EQ(getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &one), 0) << host;
      while (one != nullptr) {  // one entry a host: keep the first, free the rest
        parts_.push_back(one);
        addrinfo* next = one->ai_next;
        one->ai_next = nullptr;
        one = next;
      }
    }
    for (size_t i = 0; i + 1 < parts_.size(); ++i) parts_[i]->ai_next = parts_[i + 1];
  }
  ~AddressList() {
    for (addrinfo* part : parts_) {
      part->ai_next = nullptr;
      freeaddrinfo(part);
    }
  }
  const addrinfo* get() const { return parts_.empty() ? nullptr : parts_.front(); }

 private:
  std::vector<addrinfo*> parts_;
};

// Whether this machine can listen on IPv6's loopback at all (a host with IPv6 turned off cannot).
bool HasIpv6Loopback() {
  const int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 address{};
  address.sin6_family = AF_INET6;
  address.sin6_addr = in6addr_loopback;
  const bool bound = bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return bound;
}

bool ConnectsTo(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return false;
  const int fd = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const bool connected = fd >= 0 && connect(fd, found->ai_addr, found->ai_addrlen) == 0;
  if (fd >= 0) close(fd);
  freeaddrinfo(found);
  return connected;
}

// A name with two addresses (and one listed twice) is listened on at each, once: the first alone
// (::1 for localhost) left clients of 127.0.0.1 refused and the port there free for another
// program.
TEST(ListenOnTest, ListensOnEveryAddressANameResolvesToOnce) {
  const int port = FreePort();
  ASSERT_GT(port, 0);
  const bool ipv6 = HasIpv6Loopback();
  const AddressList addresses({"::1", "127.0.0.1", "127.0.0.1"}, port);
  auto fds = ListenOnResolved(addresses.get(), "localhost:" + std::to_string(port),
                              "server.http_address", "--http-address");
  ASSERT_TRUE(fds.ok()) << fds.status();
  EXPECT_EQ(fds->size(), ipv6 ? 2u : 1u) << "::1 (where this machine has it) and 127.0.0.1";
  EXPECT_TRUE(ConnectsTo("127.0.0.1", port));
  if (ipv6) {
    EXPECT_TRUE(ConnectsTo("::1", port));
  }
  for (const int fd : *fds) close(fd);
}

// [::] alone keeps the system's dual stack: IPv4 clients reach it too (an IPv6-only socket left
// scrapers of 127.0.0.1 refused), as gRPC's does.
TEST(ListenOnTest, TheIpv6WildcardAloneTakesIpv4Too) {
  if (!HasIpv6Loopback()) {
    // Without IPv6 there is no [::] to listen on: the address is refused, as this machine lacks it.
    EXPECT_FALSE(ListenOn("[::]:" + std::to_string(FreePort()), "k", "--f").ok());
    return;
  }
  const int port = FreePort();
  ASSERT_GT(port, 0);
  auto fds = ListenOn("[::]:" + std::to_string(port), "server.http_address", "--http-address");
  ASSERT_TRUE(fds.ok()) << fds.status();
  EXPECT_EQ(fds->size(), 1u);
  EXPECT_TRUE(ConnectsTo("::1", port));
  int v6only = 0;
  socklen_t size = sizeof(v6only);
  ASSERT_EQ(getsockopt(fds->front(), IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &size), 0);
  if (v6only == 0) {
    EXPECT_TRUE(ConnectsTo("127.0.0.1", port)) << "the system's dual stack";
  }
  std::ifstream bindv6only("/proc/sys/net/ipv6/bindv6only");
  int system_v6only = 0;
  if (bindv6only >> system_v6only) {
    EXPECT_EQ(v6only, system_v6only) << "the system's default";
  }
  for (const int fd : *fds) close(fd);
}

// The port taken on one of the addresses fails the whole listen, naming the key, and leaves none
// of the others open.
TEST(ListenOnTest, APortInUseOnOneAddressFailsAllAndLeavesNoneOpen) {
  const int port = FreePort();
  ASSERT_GT(port, 0);
  const int taken = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(taken, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(taken, 4), 0);
  const AddressList addresses({"::1", "127.0.0.1"}, port);
  auto fds = ListenOnResolved(addresses.get(), "localhost:" + std::to_string(port),
                              "server.http_address", "--http-address");
  ASSERT_FALSE(fds.ok());
  EXPECT_EQ(fds.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(fds.status().message().find("server.http_address"), std::string::npos) << fds.status();
  EXPECT_NE(fds.status().message().find("port in use"), std::string::npos) << fds.status();
  close(taken);
  if (HasIpv6Loopback()) {
    EXPECT_FALSE(ConnectsTo("::1", port))
        << "the ::1 socket opened before the failure was left open";
  }
}

}  // namespace
}  // namespace lorad::server
